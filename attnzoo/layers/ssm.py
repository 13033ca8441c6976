"""State-space token mixers: Mamba-2 (SSD) and Mamba (selective scan).

>>> m = Mamba2(dim=256, num_heads=8, rngs=nnx.Rngs(0))        # 8 heads of 2 * 256 / 8 = 64 channels
>>> y = m(x)                                   # x [B,T,256] -> [B,T,256], causal
>>> y = m(x, segment_ids=ids)                  # packed documents: state and convolution restart
>>> cache = m.init_cache(batch=B, max_len=1024)
>>> y, cache = m(prompt, cache=cache, valid_lengths=lens)   # prefill (T > 1), right-padded rows
>>> y, cache = m(token, cache=cache)           # one decoding step (T == 1)

The layers follow mamba_ssm (state-spaces/mamba ``mamba_ssm/modules/mamba2.py``,
``mamba_simple.py``) and Hugging Face transformers' ``Mamba2Mixer`` / ``MambaMixer``; parity with
the latter is tested (tests/layers/test_ssm_parity.py) through :mod:`attnzoo.zoo.convert`.

Shared contract (DESIGN.md section 3): ``m(x, *, segment_ids=None, positions=None, cache=None,
valid_lengths=None)`` maps ``x [B, T, D]`` to ``y [B, T, D]`` in the compute dtype; with a cache
(:class:`attnzoo.layers.common.RecurrentCache`) it returns ``(y, new_cache)``. Right padding
(``valid_lengths``) zeroes the inputs of the recurrence at padding tokens, which leaves the state
unchanged, and the short convolutions keep each row's inputs up to its own last token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.layers.common import (
    Dense,
    DType,
    GatedRMSNorm,
    MeshAxes,
    RecurrentCache,
    RecurrentMixer,
    ShortConvolution,
    check_bool,
    compute_dtype,
    dt_bias_init,
    log_uniform_a_init,
    partitioned,
)
from attnzoo.layers.linear import chunked_op_flops
from attnzoo.layers.registry import register_mixer
from attnzoo.pallas_kernels.common import check_float, check_int
from attnzoo.pallas_kernels.ssm.ssd import skip_connection, ssd_inputs

__all__ = ["Mamba2"]


def _expanded_width(owner: str, dim: int, expand) -> int:
    expand = check_float(owner, "expand", expand, positive=True, allow_none=False)
    width = dim * expand
    if abs(width - round(width)) > 1e-6 or round(width) < 1:
        raise ValueError(f"{owner}: dim * expand = {dim} * {expand} must be a positive integer, got {width}")
    return int(round(width))


def _check_dt_range(owner: str, dt_min, dt_max, dt_init_floor):
    dt_min = check_float(owner, "dt_min", dt_min, positive=True, allow_none=False)
    dt_max = check_float(owner, "dt_max", dt_max, positive=True, allow_none=False)
    dt_init_floor = check_float(owner, "dt_init_floor", dt_init_floor, positive=True, allow_none=False)
    if dt_min > dt_max:
        raise ValueError(f"{owner}: dt_min ({dt_min}) must not exceed dt_max ({dt_max})")
    return dt_min, dt_max, dt_init_floor


@register_mixer("mamba2")
class Mamba2(RecurrentMixer):
    """Mamba-2: selective state-space layer computed by SSD (``pk.ssd`` on the chunked engine).

    Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
    Structured State Space Duality" (arXiv:2405.21060)::

        z, x, B, C, dt = in_proj(u)                      x, z [H, P]; B, C [G, N]; dt [H]
        x, B, C = silu(conv1d(x, B, C))                  one depthwise causal conv (with bias)
        y = ssd(x, dt, A = -exp(A_log), B, C, D, dt_bias, dt_softplus=True, dt_limit)
        out = out_proj(RMSNorm_G(y * silu(z)))           gate first, statistics per group of d_inner / G

    The in-projection is stored per output (``z_proj``, ``x_proj``, ``B_proj``, ``C_proj``,
    ``dt_proj``) so that each carries its logical axes; the short convolution of ``x, B, C`` is
    depthwise, so it is stored as three (``x_conv1d``, ``B_conv1d``, ``C_conv1d``). The recurrence
    is ``pk.ssd``'s: SSD is ``simple_gla`` with ``q = C``, ``k = dt B``, ``v = x``, ``g = dt A``
    and scale 1 (:func:`attnzoo.pallas_kernels.ssm.ssd.ssd_inputs`), run through
    :class:`RecurrentMixer` (chunked op, one-token step, caches, padding, shard_map).

    Args:
      dim: model width ``D``. num_heads: SSM heads ``H``.
      expand: ``d_inner = expand * D`` (2). head_dim: ``P``; default ``d_inner / H`` (if given,
        ``H * P`` must equal ``d_inner``).
      state_dim: ``N`` (mamba_ssm's ``d_state``, 128). num_groups: ``G`` groups of B and C
        (``ngroups``, 1; divides H).
      conv_size: short-convolution taps (4). conv_bias: (True). use_bias: biases of the in / out
        projections (False).
      dt_min / dt_max / dt_init_floor: ``softplus(dt_bias)`` log-uniform in ``[dt_min, dt_max]``
        at initialisation (0.001, 0.1, 1e-4). dt_limit: clamp of the processed ``dt``, or None.
      a_init_range: ``exp(A_log) ~ U[a_init_range]`` ((1, 16)). D_per_channel: ``D [H, P]``
        instead of ``[H]`` (mamba_ssm's ``D_has_hdim``).
      norm_eps: of the gated RMSNorm (1e-5).
      impl / chunk_size / mesh_axes: of the op, as in :class:`RecurrentMixer`.
      dtype / param_dtype: compute / parameter dtypes. kernel_init: projection initialiser
        (default Lecun normal). rngs: ``nnx.Rngs`` with a ``params`` stream.

    Parameters: ``z_proj``/``x_proj.kernel [D, H, P]`` (embed, heads, head_dim);
    ``B_proj``/``C_proj.kernel [D, G, N]`` (embed, None, None); ``dt_proj.kernel [D, H]`` (embed,
    heads); ``x_conv1d.weight [K, H*P]`` (conv_kernel, heads), ``B_conv1d``/``C_conv1d.weight
    [K, G*N]`` (conv_kernel, None) with biases; ``A_log``, ``dt_bias``, ``D [H]`` (heads);
    ``norm.norm.scale [H*P]`` (norm); ``out_proj.kernel [H, P, D]`` (heads, head_dim, embed).

    Cache: ``state [B, H, N, P]`` float32, ``conv = (x, B, C)`` states ``[B, K-1, C_i]``.

    FLOPs: projections ``2 T D (2 H P + 2 G N + H) + 2 T H P D`` plus the chunked op
    (:func:`attnzoo.layers.linear.chunked_op_flops` with ``K = N``, ``V = P``).
    """

    _op = "simple_gla"
    scale = 1.0

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        expand: float = 2,
        head_dim: int | None = None,
        state_dim: int = 128,
        num_groups: int = 1,
        conv_size: int = 4,
        conv_bias: bool = True,
        use_bias: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] | None = None,
        a_init_range: tuple[float, float] = (1.0, 16.0),
        D_per_channel: bool = False,  # noqa: N803 (mamba_ssm's name of the skip)
        norm_eps: float = 1e-5,
        impl: str = "auto",
        chunk_size: int = 64,
        mesh_axes: MeshAxes = MeshAxes(),
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        kernel_init=None,
        rngs: nnx.Rngs,
    ):
        owner = type(self).__name__
        self._setup(owner, dim, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype,
                    mesh_axes=mesh_axes)
        self.d_inner = _expanded_width(owner, self.dim, expand)
        if head_dim is None:
            if self.d_inner % self.num_heads:
                raise ValueError(f"{owner}: num_heads ({self.num_heads}) must divide d_inner = dim * expand ({self.d_inner})")
            head_dim = self.d_inner // self.num_heads
        self.head_dim = check_int(owner, "head_dim", head_dim)
        if self.num_heads * self.head_dim != self.d_inner:
            raise ValueError(
                f"{owner}: num_heads * head_dim ({self.num_heads} * {self.head_dim}) must equal d_inner = "
                f"dim * expand ({self.d_inner})"
            )
        self.state_dim = check_int(owner, "state_dim", state_dim)
        self.num_groups = check_int(owner, "num_groups", num_groups)
        if self.num_heads % self.num_groups:
            raise ValueError(f"{owner}: num_groups ({self.num_groups}) must divide num_heads ({self.num_heads})")
        self.conv_size = check_int(owner, "conv_size", conv_size)
        conv_bias = check_bool(owner, "conv_bias", conv_bias)
        use_bias = check_bool(owner, "use_bias", use_bias)
        dt_min, dt_max, dt_init_floor = _check_dt_range(owner, dt_min, dt_max, dt_init_floor)
        if dt_limit is not None:
            if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2:
                raise ValueError(f"{owner}: dt_limit must be a (low, high) pair or None, got {dt_limit!r}")
            dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        self.dt_limit = dt_limit
        if not isinstance(a_init_range, (tuple, list)) or len(a_init_range) != 2 or not 0 <= a_init_range[0] <= a_init_range[1]:
            raise ValueError(f"{owner}: a_init_range must be a (low, high) pair with 0 <= low <= high, got {a_init_range!r}")
        self.D_per_channel = check_bool(owner, "D_per_channel", D_per_channel)
        norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)

        h, p, g, n = self.num_heads, self.head_dim, self.num_groups, self.state_dim
        dense = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.z_proj = Dense(self.dim, (h, p), logical_axes=("embed", "heads", "head_dim"), **dense)
        self.x_proj = Dense(self.dim, (h, p), logical_axes=("embed", "heads", "head_dim"), **dense)
        self.B_proj = Dense(self.dim, (g, n), logical_axes=("embed", None, None), **dense)
        self.C_proj = Dense(self.dim, (g, n), logical_axes=("embed", None, None), **dense)
        self.dt_proj = Dense(self.dim, h, logical_axes=("embed", "heads"), **dense)
        conv = dict(activation="silu", use_bias=conv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.x_conv1d = ShortConvolution(h * p, self.conv_size, logical_axes=("conv_kernel", "heads"), **conv)
        self.B_conv1d = ShortConvolution(g * n, self.conv_size, logical_axes=("conv_kernel", None), **conv)
        self.C_conv1d = ShortConvolution(g * n, self.conv_size, logical_axes=("conv_kernel", None), **conv)
        self.A_log = nnx.Param(
            partitioned(log_uniform_a_init(*a_init_range), ("heads",))(rngs.params(), (h,), param_dtype)
        )
        self.dt_bias = nnx.Param(
            partitioned(dt_bias_init(dt_min, dt_max, dt_init_floor), ("heads",))(rngs.params(), (h,), param_dtype)
        )
        d_shape, d_axes = ((h, p), ("heads", "head_dim")) if self.D_per_channel else ((h,), ("heads",))
        self.D = nnx.Param(partitioned(nnx.initializers.ones, d_axes)(None, d_shape, param_dtype))
        self.norm = GatedRMSNorm(
            h * p, activation="silu", epsilon=norm_eps, norm_before_gate=False, group_size=h * p // g,
            dtype=dtype, param_dtype=param_dtype,
        )
        self.out_proj = Dense((h, p), self.dim, logical_axes=("heads", "head_dim", "embed"), **dense)

    def _conv_modules(self):
        return (self.x_conv1d, self.B_conv1d, self.C_conv1d)

    def _state_shape(self, batch):
        return (batch, self.num_heads, self.state_dim, self.head_dim)

    def flops(self, seq_len: int, kv_len: int | None = None) -> int:
        """Forward matmul FLOPs of one sequence of ``seq_len`` tokens (see the class docstring)."""
        seq_len = self._flops_seq_len(seq_len, kv_len)
        d, h, p, g, n = self.dim, self.num_heads, self.head_dim, self.num_groups, self.state_dim
        projections = 2 * seq_len * d * (2 * h * p + 2 * g * n + h) + 2 * seq_len * h * p * d
        return int(projections + chunked_op_flops(seq_len, h, n, p, self.chunk_size))

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: RecurrentCache | None = None,
        valid_lengths: jax.Array | None = None,
    ):
        """The mixer over a sequence, or a prefill / decoding step from a cache.

        Args:
          x: ``[B, T, D]`` floating.
          segment_ids: ``[B, T]`` ints, packed documents: the state and the short convolution
            restart where the id changes. Not combined with ``cache``.
          positions: accepted for the uniform mixer interface and unused.
          cache: a :class:`RecurrentCache` from :meth:`init_cache`; T == 1 is one decoding step,
            T > 1 a prefill from ``cache.state``.
          valid_lengths: with a cache, ``[B]`` real tokens per row (right padding).

        Returns ``y [B, T, D]`` in the compute dtype; with a cache ``(y, new_cache)``.
        """
        del positions
        mask = self._begin(x, segment_ids, cache, valid_lengths)
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        batch, length = x.shape[:2]
        convs: list = []
        kw = dict(segment_ids=segment_ids, cache=cache, mask=mask, new_convs=convs)
        xs = self._convolve(0, self.x_proj(x), **kw)
        B = self._convolve(1, self.B_proj(x), **kw)
        C = self._convolve(2, self.C_proj(x), **kw)
        dt = self.dt_proj(x)
        A = -jnp.exp(self.A_log[...].astype(jnp.promote_types(self.A_log.dtype, jnp.float32)))
        q, k, v, g = ssd_inputs(xs, dt, A, B, C, dt_bias=self.dt_bias[...], dt_softplus=True, dt_limit=self.dt_limit)
        o, state = self._recur(q, k, v, g, segment_ids=segment_ids, cache=cache, mask=mask)
        o = skip_connection(o, xs, self.D[...])
        o = o.reshape(batch, length, self.num_heads * self.head_dim)
        z = self.z_proj(x).reshape(o.shape)
        y = self.norm(o.astype(dtype), z).reshape(batch, length, self.num_heads, self.head_dim)
        return self._finish(self.out_proj(y), cache, state, convs, mask, length)
