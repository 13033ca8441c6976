"""The mixer registry: every token mixer registers a name that backbones and configs refer to.

>>> @register_mixer("my_mixer")
... class MyMixer(nnx.Module):
...     def __init__(self, dim, num_heads, *, rngs, **options): ...
>>> list_mixers("att*")
['attention']
>>> m = create_mixer("attention", dim=256, num_heads=4, rngs=nnx.Rngs(0), num_kv_heads=2)
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, TypeVar

from flax import nnx

__all__ = ["register_mixer", "list_mixers", "create_mixer", "get_mixer_class"]

_MIXERS: dict[str, Callable[..., nnx.Module]] = {}

MixerT = TypeVar("MixerT", bound=Callable[..., nnx.Module])


def register_mixer(name: str) -> Callable[[MixerT], MixerT]:
    """Class decorator registering a mixer under ``name``.

    The class (or factory) is called as ``cls(dim=..., num_heads=..., rngs=..., **options)``.
    Registering a different object under a taken name raises ``ValueError``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_mixer: name must be a non-empty string, got {name!r}")

    def decorate(cls: MixerT) -> MixerT:
        existing = _MIXERS.get(name)
        same = existing is not None and (
            existing is cls or (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
        )
        if existing is not None and not same:
            raise ValueError(f"register_mixer: {name!r} is already registered to {existing.__module__}.{existing.__qualname__}")
        _MIXERS[name] = cls
        return cls

    return decorate


def list_mixers(pattern: str = "*") -> list[str]:
    """Sorted names of registered mixers matching the shell-style ``pattern`` (fnmatch)."""
    return sorted(fnmatch.filter(_MIXERS, pattern))


def get_mixer_class(name: str) -> Callable[..., nnx.Module]:
    """The class registered under ``name``; ``ValueError`` naming the known mixers if unknown."""
    try:
        return _MIXERS[name]
    except KeyError:
        known = ", ".join(list_mixers()) or "(none)"
        raise ValueError(f"unknown mixer {name!r}; known mixers: {known}") from None


def create_mixer(name: str, *, dim: int, num_heads: int, rngs: nnx.Rngs, **options: Any) -> nnx.Module:
    """Builds the mixer registered as ``name`` with width ``dim``, ``num_heads`` heads and options."""
    return get_mixer_class(name)(dim=dim, num_heads=num_heads, rngs=rngs, **options)
