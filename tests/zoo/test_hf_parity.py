"""Parity with Hugging Face transformers' PyTorch modules, through attnzoo's converters.

Each test builds the transformers module with random weights, hands its ``state_dict`` to the
converter as plain numpy arrays, and compares outputs on the same random inputs to float32
tolerance. torch and transformers are not dependencies of attnzoo: these tests skip without
them, and ``make test`` runs them in their own environment (``make test-parity``).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import layers
from attnzoo.pallas_kernels.testing import assert_close
from attnzoo.zoo import convert
from tests.zoo.torch_testing import numpy_state

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity


def randomize_torch(module, seed: int, scale: float = 0.3):
    """Every parameter ~ N(0, scale^2), then A_log / dt biases / norms / D in published ranges."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            value = torch.randn(param.shape, generator=generator) * scale
            if name.endswith("A_log"):
                value = torch.log(torch.rand(param.shape, generator=generator) * 15 + 1)
            elif name.endswith("dt_bias") or name.endswith("dt_proj.bias"):  # softplus(dt_bias) in [1e-3, 0.1]
                dt = torch.exp(torch.rand(param.shape, generator=generator) * (np.log(0.1) - np.log(1e-3)) + np.log(1e-3))
                value = dt + torch.log(-torch.expm1(-dt))
            elif name.endswith("norm.weight") or name.endswith(".D") or name == "D":
                value = 1.0 + value
            param.copy_(value)
    return module


def test_mamba2_mixer_matches_transformers():
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Config, Mamba2Mixer

    config = Mamba2Config(hidden_size=48, num_heads=6, head_dim=16, expand=2, state_size=12, n_groups=2,
                          chunk_size=16, num_hidden_layers=1, use_conv_bias=True, use_bias=False)
    torch_mixer = randomize_torch(Mamba2Mixer(config, layer_idx=0).eval(), 0)
    x = np.random.default_rng(1).normal(size=(2, 45, 48)).astype(np.float32)
    with torch.no_grad():
        expected = torch_mixer(torch.from_numpy(x)).numpy()

    module = layers.create_mixer("mamba2", dim=48, num_heads=6, state_dim=12, num_groups=2, chunk_size=16,
                                 rngs=nnx.Rngs(0))
    unused = convert.load_hf_mamba2_mixer(module, numpy_state(torch_mixer))
    assert unused == []
    out = module(jnp.asarray(x))
    assert_close(out, expected, "mamba2 vs transformers", dtype=jnp.float32)

    # Decoding from a prefill also matches the full forward of transformers.
    cache = module.init_cache(2, 64)
    first, cache = module(jnp.asarray(x[:, :30]), cache=cache)
    steps = []
    for t in range(30, 45):
        y, cache = module(jnp.asarray(x[:, t : t + 1]), cache=cache)
        steps.append(y)
    decoded = jnp.concatenate([first, *steps], axis=1)
    assert_close(decoded, expected, "mamba2 decoded vs transformers", dtype=jnp.float32)

    # The comparison catches a wrong conversion (B and C swapped).
    module.B_proj.kernel.set_value(module.C_proj.kernel.get_value())
    with pytest.raises(AssertionError, match="relative RMS"):
        assert_close(module(jnp.asarray(x)), expected, "corrupted", dtype=jnp.float32)


def test_converter_errors_name_the_key():
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Config, Mamba2Mixer

    config = Mamba2Config(hidden_size=16, num_heads=2, head_dim=16, expand=2, state_size=4, n_groups=1,
                          num_hidden_layers=1)
    state = numpy_state(Mamba2Mixer(config, layer_idx=0))
    module = layers.create_mixer("mamba2", dim=16, num_heads=2, state_dim=4, rngs=nnx.Rngs(0))
    with pytest.raises(KeyError, match="state_dict has no 'layer.in_proj.weight'"):
        convert.load_hf_mamba2_mixer(module, state, prefix="layer.")
    wrong = layers.create_mixer("mamba2", dim=16, num_heads=2, state_dim=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'in_proj.weight' has shape \(74, 16\), expected \(82, 16\)"):
        convert.load_hf_mamba2_mixer(wrong, state)
    with pytest.raises(ValueError, match="state_dict keys not converted: \\['extra'\\]"):
        convert.load_hf_mamba2_mixer(module, dict(state, extra=np.zeros(1)))


def test_kimi_delta_attention_matches_transformers():
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearConfig, KimiLinearDeltaAttention

    config = KimiLinearConfig(hidden_size=48, linear_num_heads=3, linear_head_dim=16, linear_conv_kernel_dim=4,
                              num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=3)
    torch_layer = randomize_torch(KimiLinearDeltaAttention(config, layer_idx=0).eval(), 2)
    x = np.random.default_rng(3).normal(size=(2, 41, 48)).astype(np.float32)
    with torch.no_grad():
        expected = torch_layer(torch.from_numpy(x)).numpy()
    module = layers.create_mixer("kda", dim=48, num_heads=3, head_dim=16, output_gate_bias=False, chunk_size=16,
                                 norm_eps=config.rms_norm_eps, rngs=nnx.Rngs(0))
    assert convert.load_hf_kimi_delta_attention(module, numpy_state(torch_layer)) == []
    assert_close(module(jnp.asarray(x)), expected, "kda vs transformers", dtype=jnp.float32)


def _olmo_hybrid_gated_deltanet(heads, v_heads, head_k_dim, head_v_dim, allow_neg_eigval, seed):
    from transformers.models.olmo_hybrid.configuration_olmo_hybrid import OlmoHybridConfig
    from transformers.models.olmo_hybrid.modeling_olmo_hybrid import OlmoHybridGatedDeltaNet

    config = OlmoHybridConfig(hidden_size=48, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                              layer_types=["linear_attention", "full_attention"], linear_num_key_heads=heads,
                              linear_num_value_heads=v_heads, linear_key_head_dim=head_k_dim,
                              linear_value_head_dim=head_v_dim, linear_allow_neg_eigval=allow_neg_eigval)
    torch_layer = randomize_torch(OlmoHybridGatedDeltaNet(config, layer_idx=0).eval(), seed)
    module = layers.create_mixer("gated_deltanet", dim=48, num_heads=heads, num_v_heads=v_heads, head_dim=head_k_dim,
                                 expand_v=head_v_dim / head_k_dim, allow_neg_eigval=allow_neg_eigval,
                                 conv_size=config.linear_conv_kernel_dim, chunk_size=16, rngs=nnx.Rngs(0))
    return torch_layer, module


@pytest.mark.parametrize(
    "heads, v_heads, head_k_dim, head_v_dim, allow_neg_eigval, seed",
    [(2, 4, 12, 24, True, 12), (3, 3, 16, 16, False, 14)],  # grouped value heads, expand_v 2 / plain, expand_v 1
)
def test_olmo_hybrid_gated_deltanet_matches_transformers(heads, v_heads, head_k_dim, head_v_dim, allow_neg_eigval,
                                                         seed):
    torch_layer, module = _olmo_hybrid_gated_deltanet(heads, v_heads, head_k_dim, head_v_dim, allow_neg_eigval, seed)
    x = np.random.default_rng(seed + 1).normal(size=(2, 37, 48)).astype(np.float32)

    def reference(inputs):
        with torch.no_grad():
            return torch_layer(torch.from_numpy(np.ascontiguousarray(inputs))).numpy()

    expected = reference(x)
    assert convert.load_hf_olmo_hybrid_gated_deltanet(module, numpy_state(torch_layer)) == []
    name = f"gated_deltanet H={heads} Hv={v_heads}"
    assert_close(module(jnp.asarray(x)), expected, f"{name} vs transformers", dtype=jnp.float32)

    # Packed documents (segment_ids) equal transformers run on each document alone (its torch path has no
    # cu_seqlens support, so the documents are run separately).
    bounds = [(0, 0, 15), (0, 15, 37), (1, 0, 9), (1, 9, 30), (1, 30, 37)]
    segment_ids = np.zeros((2, 37), np.int32)
    packed = np.zeros_like(expected)
    for index, (row, start, stop) in enumerate(bounds):
        segment_ids[row, start:stop] = index
        packed[row, start:stop] = reference(x[row : row + 1, start:stop])[0]
    out = module(jnp.asarray(x), segment_ids=jnp.asarray(segment_ids))
    assert_close(out, packed, f"{name} packed vs transformers per document", dtype=jnp.float32)

    # Decoding from a prefill matches the full forward of transformers.
    cache = module.init_cache(2, 64)
    first, cache = module(jnp.asarray(x[:, :30]), cache=cache)
    steps = []
    for t in range(30, 37):
        y, cache = module(jnp.asarray(x[:, t : t + 1]), cache=cache)
        steps.append(y)
    decoded = jnp.concatenate([first, *steps], axis=1)
    assert_close(decoded, expected, f"{name} decoded vs transformers", dtype=jnp.float32)

    # The comparison catches a wrong conversion (a and b projections swapped).
    module.a_proj.kernel.set_value(module.b_proj.kernel.get_value())
    with pytest.raises(AssertionError, match="relative RMS"):
        assert_close(module(jnp.asarray(x)), expected, "corrupted", dtype=jnp.float32)


def test_olmo_hybrid_gated_deltanet_converter_checks_the_layout():
    torch_layer, module = _olmo_hybrid_gated_deltanet(2, 4, 12, 24, True, 16)
    state = numpy_state(torch_layer)
    # Four key heads instead of two: the query projection no longer fits.
    wrong = layers.create_mixer("gated_deltanet", dim=48, num_heads=4, num_v_heads=4, head_dim=12, expand_v=2.0,
                                rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'q_proj.weight' has shape \(24, 48\), expected \(48, 48\)"):
        convert.load_hf_olmo_hybrid_gated_deltanet(wrong, state)
    ungated = layers.create_mixer("gated_deltanet", dim=48, num_heads=2, num_v_heads=4, head_dim=12, expand_v=2.0,
                                  use_gate=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_gate=True"):
        convert.load_hf_olmo_hybrid_gated_deltanet(ungated, state)
    with pytest.raises(KeyError, match="state_dict has no 'mixer.q_proj.weight'"):
        convert.load_hf_olmo_hybrid_gated_deltanet(module, state, prefix="mixer.")
    with pytest.raises(ValueError, match="state_dict keys not converted: \\['extra'\\]"):
        convert.load_hf_olmo_hybrid_gated_deltanet(module, dict(state, extra=np.zeros(1)))


@pytest.mark.parametrize("layer_idx", [0, 2])
def test_minimax_lightning_attention_matches_transformers(layer_idx):
    from transformers.models.minimax.modeling_minimax import MiniMaxConfig, MiniMaxLightningAttention

    config = MiniMaxConfig(hidden_size=48, num_attention_heads=4, head_dim=12, num_hidden_layers=4, block_size=16,
                           num_key_value_heads=4, layer_types=["linear_attention"] * 4)
    torch_layer = randomize_torch(MiniMaxLightningAttention(config, layer_idx=layer_idx).eval(), 4)
    x = np.random.default_rng(5).normal(size=(2, 37, 48)).astype(np.float32)
    with torch.no_grad():
        expected = torch_layer(torch.from_numpy(x), position_embeddings=None, attention_mask=None)[0].numpy()
    module = layers.create_mixer("lightning", dim=48, num_heads=4, head_dim=12, layer_idx=layer_idx, num_layers=4,
                                 chunk_size=16, rngs=nnx.Rngs(0))
    assert convert.load_hf_minimax_lightning_attention(module, numpy_state(torch_layer)) == []
    assert_close(module(jnp.asarray(x)), expected, f"lightning layer {layer_idx} vs transformers", dtype=jnp.float32)


def test_zamba2_model_matches_transformers():
    from transformers import Zamba2Config, Zamba2ForCausalLM

    from attnzoo.zoo.zamba import ZambaLM

    config = Zamba2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=8, layers_block_type=["mamba", "hybrid"] * 4,
        mamba_d_state=8, n_mamba_heads=4, mamba_headdim=16, mamba_ngroups=1, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=48, adapter_rank=8, use_shared_attention_adapter=True,
        use_mem_rope=True, chunk_size=16, num_mem_blocks=2, tie_word_embeddings=True,
    )
    torch_model = randomize_torch(Zamba2ForCausalLM(config).eval(), 6, scale=0.2)
    tokens = np.random.default_rng(7).integers(0, 64, size=(2, 23))
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(tokens)).logits.numpy()
    model = ZambaLM(64, 32, 8, 4, mixer="mamba2", shared_every=2, shared_offset=1, num_shared_blocks=2, mlp_dim=48,
                    adapter_rank=8, attention_adapters=True, use_rope=True,
                    mixer_options=dict(state_dim=8, chunk_size=16, dt_limit=(config.time_step_min, float("inf"))),
                    rngs=nnx.Rngs(0))
    assert convert.load_hf_zamba2(model, numpy_state(torch_model)) == []
    assert_close(model(jnp.asarray(tokens)), expected, "zamba2 logits vs transformers", dtype=jnp.float32)


def test_mamba_mixer_matches_transformers():
    from transformers.models.mamba.modeling_mamba import MambaConfig, MambaMixer

    config = MambaConfig(hidden_size=24, state_size=6, expand=2, conv_kernel=4, time_step_rank=3, num_hidden_layers=1)
    torch_mixer = randomize_torch(MambaMixer(config, layer_idx=0).eval(), 8)
    x = np.random.default_rng(9).normal(size=(2, 29, 24)).astype(np.float32)
    with torch.no_grad():
        expected = torch_mixer(torch.from_numpy(x)).numpy()
    module = layers.create_mixer("mamba", dim=24, num_heads=1, state_dim=6, dt_rank=3, chunk_size=16, rngs=nnx.Rngs(0))
    assert convert.load_hf_mamba_mixer(module, numpy_state(torch_mixer)) == []
    assert_close(module(jnp.asarray(x)), expected, "mamba vs transformers", dtype=jnp.float32)
    cache = module.init_cache(2, 64)
    first, cache = module(jnp.asarray(x[:, :20]), cache=cache)
    steps = [module(jnp.asarray(x[:, t : t + 1]), cache=cache) for t in range(20, 21)]
    assert_close(steps[0][0][:, 0], expected[:, 20], "mamba decoded step", dtype=jnp.float32)


def test_jamba_mamba_mixer_matches_transformers():
    from transformers.models.jamba.modeling_jamba import JambaConfig, JambaMambaMixer

    config = JambaConfig(hidden_size=24, mamba_d_state=6, mamba_expand=2, mamba_dt_rank=3, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_experts=1)
    torch_mixer = randomize_torch(JambaMambaMixer(config, layer_idx=0).eval(), 10)
    x = np.random.default_rng(11).normal(size=(2, 33, 24)).astype(np.float32)
    with torch.no_grad():
        expected = torch_mixer(torch.from_numpy(x)).numpy()
    module = layers.create_mixer("mamba", dim=24, num_heads=1, state_dim=6, dt_rank=3, inner_layernorms=True,
                                 norm_eps=config.rms_norm_eps, chunk_size=16, rngs=nnx.Rngs(0))
    assert convert.load_hf_mamba_mixer(module, numpy_state(torch_mixer)) == []
    assert_close(module(jnp.asarray(x)), expected, "jamba mamba vs transformers", dtype=jnp.float32)
