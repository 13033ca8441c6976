"""The model registry: backbones register a factory under a name that configs refer to.

>>> @register_model("my_model")
... def my_model(*, rngs, **overrides):
...     return MyModel(**{"dim": 64, **overrides}, rngs=rngs)
>>> list_models("vit_*")
['vit_base_patch16_224', 'vit_small_patch16_224', 'vit_tiny_patch16_224']
>>> m = create_model("vit_tiny_patch16_224", rngs=nnx.Rngs(0), num_classes=10)
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, TypeVar

from flax import nnx

__all__ = ["register_model", "list_models", "get_model_factory", "create_model"]

_MODELS: dict[str, Callable[..., nnx.Module]] = {}

FactoryT = TypeVar("FactoryT", bound=Callable[..., nnx.Module])


def register_model(name: str) -> Callable[[FactoryT], FactoryT]:
    """Decorator registering a factory ``fn(*, rngs, **overrides) -> nnx.Module`` under ``name``.

    Registering a different function under a taken name raises ``ValueError`` (re-registering the
    same function, e.g. on module reload, is allowed).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_model: name must be a non-empty string, got {name!r}")

    def decorate(factory: FactoryT) -> FactoryT:
        if not callable(factory):
            raise TypeError(f"register_model({name!r}): expected a callable factory, got {type(factory).__name__}")
        existing = _MODELS.get(name)
        same = existing is not None and (
            existing is factory
            or (existing.__module__, existing.__qualname__) == (factory.__module__, factory.__qualname__)
        )
        if existing is not None and not same:
            raise ValueError(
                f"register_model: {name!r} is already registered to {existing.__module__}.{existing.__qualname__}"
            )
        _MODELS[name] = factory
        return factory

    return decorate


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching the shell-style ``pattern`` (fnmatch)."""
    if not isinstance(pattern, str):
        raise TypeError(f"list_models: pattern must be a string, got {type(pattern).__name__}")
    return sorted(fnmatch.filter(_MODELS, pattern))


def _suggestions(name: str) -> list[str]:
    """Up to five registered names for a mistyped ``name``: those it begins (``vit_tiny`` ->
    ``vit_tiny_patch16_224``), then the closest spellings, then those containing it."""
    names = list_models()
    starting = [n for n in names if name and n.startswith(name)]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    containing = [n for n in names if name and name in n]
    return list(dict.fromkeys(starting + close + containing))[:5]


def get_model_factory(name: str) -> Callable[..., nnx.Module]:
    """The factory registered as ``name``.

    Raises ``ValueError`` for an unknown name, naming it, listing close matches and pointing to
    :func:`list_models`.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    try:
        return _MODELS[name]
    except KeyError:
        suggestions = _suggestions(name)
        hint = f"; did you mean {', '.join(map(repr, suggestions))}?" if suggestions else ""
        raise ValueError(
            f"unknown model {name!r}{hint} Call attnzoo.zoo.list_models() for the {len(_MODELS)} registered names."
        ) from None


def create_model(name: str, *, rngs: nnx.Rngs, **overrides: Any) -> nnx.Module:
    """Builds the model registered as ``name``; ``overrides`` replace any constructor argument."""
    return get_model_factory(name)(rngs=rngs, **overrides)
