import math

import jax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from palmlite import (ModelConfig, Transformer, count_params, device_peak_flops, flops_per_token,
                      kv_cache_bytes_per_token, mfu, presets)
from palmlite.config import ACTIVATIONS, BLOCKS, NORMS, POSITIONS


def instantiated_size(cfg: ModelConfig) -> int:
    """Parameters of the real module, from its abstract shapes (nothing allocated)."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


SMALL = dict(vocab_size=97, d_model=24, n_layers=2, n_heads=4, d_ff=40, max_seq_len=33)


@pytest.mark.parametrize("field,values", [("norm", NORMS), ("activation", ACTIVATIONS),
                                          ("block", BLOCKS), ("position", POSITIONS),
                                          ("tie_embeddings", (True, False)),
                                          ("use_bias", (True, False)),
                                          ("n_kv_heads", (1, 2, 4)), ("head_dim", (None, 10))])
def test_count_params_equals_instantiated_model_for_every_toggle(field, values):
    for value in values:
        cfg = ModelConfig(**{**SMALL, field: value})
        assert count_params(cfg) == instantiated_size(cfg), (field, value)


@settings(max_examples=25, deadline=None)
@given(norm=st.sampled_from(NORMS), activation=st.sampled_from(ACTIVATIONS),
       block=st.sampled_from(BLOCKS), position=st.sampled_from(POSITIONS),
       tie=st.booleans(), bias=st.booleans(), kv=st.sampled_from([1, 2, 4]),
       layers=st.integers(1, 3))
def test_count_params_equals_instantiated_model_for_toggle_combinations(
        norm, activation, block, position, tie, bias, kv, layers):
    cfg = ModelConfig(**{**SMALL, "n_layers": layers}, norm=norm, activation=activation,
                      block=block, position=position, tie_embeddings=tie, use_bias=bias,
                      n_kv_heads=kv)
    assert count_params(cfg) == instantiated_size(cfg)


def test_flops_per_token_is_palm_appendix_b_formula():
    cfg = ModelConfig(**SMALL)
    n = count_params(cfg)
    L, H, Q = cfg.n_layers, cfg.n_heads, cfg.head_size
    assert flops_per_token(cfg, 16) == 6 * n + 12 * L * H * Q * 16
    assert flops_per_token(cfg) == 6 * n + 12 * L * H * Q * cfg.max_seq_len


def test_palm_540b_model_flops_utilisation_is_46_2_percent():
    """PaLM Appendix B: 238.3k tokens/s on 6144 TPU v4 chips (275 TFLOP/s) -> 46.2% MFU."""
    cfg = presets.get("palm-540b")
    peak = 6144 * device_peak_flops("TPU v4")
    assert round(100 * mfu(238.3e3, cfg, 2048, peak), 1) == 46.2


def test_device_peaks_and_unknown_devices():
    assert device_peak_flops("TPU v4") == 275e12
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak_flops("TPU v5 lite") == 197e12
    assert device_peak_flops("cpu") is None  # never a made-up number
    assert device_peak_flops("Some Future Chip") is None


def test_multi_query_shrinks_the_kv_cache_by_the_number_of_heads():
    """PaLM §2: with one K/V head the decode cache is n_heads times smaller."""
    mha = ModelConfig(**SMALL, n_kv_heads=4)
    mqa = mha.replace(n_kv_heads=1)
    gqa = mha.replace(n_kv_heads=2)
    assert kv_cache_bytes_per_token(mha) == 4 * kv_cache_bytes_per_token(mqa)
    assert kv_cache_bytes_per_token(gqa) == 2 * kv_cache_bytes_per_token(mqa)
    # 2 (K and V) x layers x kv heads x head size x bytes
    assert kv_cache_bytes_per_token(mqa, "bfloat16") == 2 * 2 * 1 * 6 * 2
