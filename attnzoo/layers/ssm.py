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
    shard_map_batch_heads,
    DType,
    GatedRMSNorm,
    MeshAxes,
    RMSNorm,
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
from attnzoo import pallas_kernels as pk
from attnzoo.pallas_kernels import common as pk_common
from attnzoo.pallas_kernels.common import check_float, check_int
from attnzoo.pallas_kernels.ssm.ssd import skip_connection, ssd_inputs

__all__ = ["Mamba2", "Mamba"]


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


@register_mixer("mamba")
class Mamba(RecurrentMixer):
    """Mamba (S6): the selective scan with a diagonal state per channel (``pk.selective_scan``).

    Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"
    (arXiv:2312.00752; state-spaces/mamba ``mamba_simple.py``, transformers ``MambaMixer``)::

        x, z = in_proj(u)                                 x, z [d_inner]
        x = silu(conv1d(x))                               depthwise causal conv (with bias)
        dt_r, B, C = x_proj(x)                            dt_r [R], B, C [N]
        dt = softplus(dt_proj(dt_r) + dt_bias)            [d_inner]
        y = selective_scan(x, dt, A = -exp(A_log), B, C, D) * silu(z)
        out = out_proj(y)

    The in-projection is stored as ``x_in_proj`` and ``z_proj``, ``x_proj`` as ``dt_in_proj``,
    ``B_proj`` and ``C_proj``, and ``dt_proj``'s bias as ``dt_bias``. Mamba has no heads:
    ``num_heads`` is accepted for the uniform mixer interface and unused.

    Args:
      dim: model width ``D``. num_heads: unused.
      expand: ``d_inner = expand * D`` (2). state_dim: ``N`` (``d_state``, 16).
      dt_rank: ``R``; "auto" is ``ceil(D / 16)``.
      conv_size (4) / conv_bias (True) / use_bias (in/out projection biases, False).
      dt_min / dt_max / dt_init_floor: ``softplus(dt_bias)`` log-uniform in ``[dt_min, dt_max]``
        at initialisation (0.001, 0.1, 1e-4); ``dt_proj.kernel ~ U(+-R^-0.5 dt_scale)``
        (dt_scale 1).
      inner_layernorms: RMSNorms (no bias, ``norm_eps``) on ``dt_r``, ``B`` and ``C`` after
        ``x_proj`` (Jamba's and Hymba's Mamba; False).
      output_projection: apply ``out_proj`` (True); without it the layer returns the gated scan
        output ``[B, T, d_inner]`` (for blocks that fuse their own output projection, Hymba).
      impl / chunk_size: of ``pk.selective_scan``; under a mesh with ``pallas`` the op runs in
        ``shard_map`` over the batch (``mesh_axes.batch``; channels are not split because B and C
        are shared by all channels).
      dtype / param_dtype / kernel_init / rngs: as in :class:`Mamba2`.

    Initialisation (mamba_ssm): ``A_log[c, n] = log(n + 1)`` (S4D-real), ``D = 1``.

    Parameters (with ``inner_layernorms`` also ``dt_layernorm.scale [R]``, ``B_layernorm``/
    ``C_layernorm.scale [N]`` (norm)): ``x_in_proj``/``z_proj.kernel [D, d_inner]`` (embed, mlp); ``conv1d.weight [K,
    d_inner]`` (conv_kernel, mlp) and bias; ``dt_in_proj.kernel [d_inner, R]``,
    ``B_proj``/``C_proj.kernel [d_inner, N]`` (mlp, None); ``dt_proj.kernel [R, d_inner]`` (None,
    mlp); ``dt_bias``, ``D [d_inner]`` (mlp); ``A_log [d_inner, N]`` (mlp, None);
    ``out_proj.kernel [d_inner, D]`` (mlp, embed).

    Cache: ``state [B, d_inner, N]`` float32, ``conv = (x,)`` state ``[B, K-1, d_inner]``.

    FLOPs: ``2 T (2 D d_inner + d_inner (R + 2 N) + R d_inner + d_inner D)`` for the projections
    plus ``6 T d_inner N`` for the scan (decay-multiply-add of the state and the readout, counted
    as 2 FLOPs per multiply-add).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        *,
        expand: float = 2,
        state_dim: int = 16,
        dt_rank: int | str = "auto",
        conv_size: int = 4,
        conv_bias: bool = True,
        use_bias: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        inner_layernorms: bool = False,
        output_projection: bool = True,
        norm_eps: float = 1e-6,
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
        inner_layernorms = check_bool(owner, "inner_layernorms", inner_layernorms)
        output_projection = check_bool(owner, "output_projection", output_projection)
        norm_eps = check_float(owner, "norm_eps", norm_eps, positive=True, allow_none=False)
        self.state_dim = check_int(owner, "state_dim", state_dim)
        if dt_rank == "auto":
            dt_rank = -(-self.dim // 16)
        self.dt_rank = check_int(owner, "dt_rank", dt_rank)
        self.conv_size = check_int(owner, "conv_size", conv_size)
        conv_bias = check_bool(owner, "conv_bias", conv_bias)
        use_bias = check_bool(owner, "use_bias", use_bias)
        dt_min, dt_max, dt_init_floor = _check_dt_range(owner, dt_min, dt_max, dt_init_floor)
        dt_scale = check_float(owner, "dt_scale", dt_scale, positive=True, allow_none=False)

        inner, rank, n = self.d_inner, self.dt_rank, self.state_dim
        dense = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, rngs=rngs)
        self.x_in_proj = Dense(self.dim, inner, use_bias=use_bias, logical_axes=("embed", "mlp"), **dense)
        self.z_proj = Dense(self.dim, inner, use_bias=use_bias, logical_axes=("embed", "mlp"), **dense)
        self.conv1d = ShortConvolution(inner, self.conv_size, activation="silu", use_bias=conv_bias, dtype=dtype,
                                       param_dtype=param_dtype, logical_axes=("conv_kernel", "mlp"), rngs=rngs)
        self.dt_in_proj = Dense(inner, rank, logical_axes=("mlp", None), **dense)
        self.B_proj = Dense(inner, n, logical_axes=("mlp", None), **dense)
        self.C_proj = Dense(inner, n, logical_axes=("mlp", None), **dense)
        bound = rank**-0.5 * dt_scale
        dt_kernel_init = nnx.initializers.uniform(2 * bound)
        self.dt_proj = Dense(rank, inner, logical_axes=(None, "mlp"), dtype=dtype, param_dtype=param_dtype,
                             kernel_init=lambda key, shape, dtype: dt_kernel_init(key, shape, dtype) - bound, rngs=rngs)
        self.dt_bias = nnx.Param(
            partitioned(dt_bias_init(dt_min, dt_max, dt_init_floor), ("mlp",))(rngs.params(), (inner,), param_dtype)
        )

        def s4d_real(key, shape, dtype):
            del key
            return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(dtype)

        self.A_log = nnx.Param(partitioned(s4d_real, ("mlp", None))(rngs.params(), (inner, n), param_dtype))
        self.D = nnx.Param(partitioned(nnx.initializers.ones, ("mlp",))(None, (inner,), param_dtype))
        if inner_layernorms:
            norm = dict(epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.dt_layernorm, self.B_layernorm, self.C_layernorm = RMSNorm(rank, **norm), RMSNorm(n, **norm), RMSNorm(n, **norm)
        else:
            self.dt_layernorm = self.B_layernorm = self.C_layernorm = None
        self.out_proj = (
            Dense(inner, self.dim, use_bias=use_bias, logical_axes=("mlp", "embed"), **dense) if output_projection else None
        )

    def _conv_modules(self):
        return (self.conv1d,)

    def _state_shape(self, batch):
        return (batch, self.d_inner, self.state_dim)

    def flops(self, seq_len: int, kv_len: int | None = None) -> int:
        """Forward FLOPs of one sequence of ``seq_len`` tokens (see the class docstring)."""
        seq_len = self._flops_seq_len(seq_len, kv_len)
        d, inner, rank, n = self.dim, self.d_inner, self.dt_rank, self.state_dim
        output = inner * d if self.out_proj is not None else 0
        projections = 2 * seq_len * (2 * d * inner + inner * (rank + 2 * n) + rank * inner + output)
        return int(projections + 6 * seq_len * inner * n)

    def _scan(self, x, dt, A, B, C, segment_ids, initial):
        """``pk.selective_scan`` (shard-mapped over the batch for Pallas under a mesh)."""
        options = dict(chunk_size=self.chunk_size, impl=self.impl, return_last_state=initial is not None)

        if initial is None:
            def run(x, dt, B, C, *ids):
                return pk.selective_scan(x, dt, A, B, C, segment_ids=ids[0] if ids else None, **options)[0]
            args, layouts, out = (x, dt, B, C), ("BTD", "BTD", "BTN", "BTN"), "BTD"
            if segment_ids is not None:
                args, layouts = args + (segment_ids,), layouts + ("BT",)
        else:
            def run(x, dt, B, C, h0):
                return pk.selective_scan(x, dt, A, B, C, initial_state=h0, **options)
            args, layouts, out = (x, dt, B, C, initial), ("BTD", "BTD", "BTN", "BTN", "BDN"), ("BTD", "BDN")
        if pk_common.resolve_impl(self.impl, type(self).__name__) != "pallas":
            result = run(*args)
        else:
            result = shard_map_batch_heads(run, args, layouts, out, self.mesh_axes, owner=type(self).__name__)
        return result if initial is not None else (result, None)

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: RecurrentCache | None = None,
        valid_lengths: jax.Array | None = None,
    ):
        """The mixer over a sequence, or a prefill / decoding step from a cache (as :class:`Mamba2`).

        Returns ``y [B, T, D]`` in the compute dtype; with a cache ``(y, new_cache)``.
        """
        del positions
        mask = self._begin(x, segment_ids, cache, valid_lengths)
        dtype = compute_dtype(self.dtype, x, self.param_dtype)
        stat_dtype = jnp.promote_types(dtype, jnp.float32)
        length = x.shape[1]
        convs: list = []
        xs = self._convolve(0, self.x_in_proj(x), segment_ids=segment_ids, cache=cache, mask=mask, new_convs=convs)
        dt_low, B, C = self.dt_in_proj(xs), self.B_proj(xs), self.C_proj(xs)
        if self.dt_layernorm is not None:
            dt_low, B, C = self.dt_layernorm(dt_low), self.B_layernorm(B), self.C_layernorm(C)
        dt = self.dt_proj(dt_low).astype(stat_dtype) + self.dt_bias[...].astype(stat_dtype)
        dt = jax.nn.softplus(dt)
        if mask is not None:  # dt = 0: no decay and no input, the state passes padding unchanged
            dt = jnp.where(mask[..., None], dt, 0)
        A = -jnp.exp(self.A_log[...].astype(stat_dtype))
        if cache is not None and length == 1:
            y, state = pk.selective_scan_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], cache.state)
            y, state = y[:, None], state.astype(cache.state.dtype)
        else:
            y, state = self._scan(xs, dt, A, B, C, segment_ids, None if cache is None else cache.state)
            state = None if state is None else state.astype(cache.state.dtype)
        y = y.astype(stat_dtype) + xs.astype(stat_dtype) * self.D[...].astype(stat_dtype)
        y = (y * jax.nn.silu(self.z_proj(x).astype(stat_dtype))).astype(dtype)
        if self.out_proj is not None:
            y = self.out_proj(y)
        return self._finish(y, cache, state, convs, mask, length)
