import pytest

from palmlite import ModelConfig, count_params, presets
from palmlite.accounting import norm_params


def test_every_preset_is_a_valid_config():
    assert {"palm-8b", "palm-62b", "palm-540b", "gpt2-124m", "gopher-44m", "gopher-280b",
            "tiny", "small"} <= set(presets.names())
    for name in presets.names():
        assert isinstance(presets.get(name), ModelConfig)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match="palm-8b"):
        presets.get("palm-9b")


def test_overrides_are_validated():
    assert presets.get("tiny", block="serial").block == "serial"
    with pytest.raises(ValueError, match="n_kv_heads"):
        presets.get("tiny", n_kv_heads=3)


@pytest.mark.parametrize("name,paper_billions", [("palm-8b", "8.63"), ("palm-62b", "62.50"),
                                                 ("palm-540b", "540.35")])
def test_palm_table1_parameter_counts(name, paper_billions):
    """PaLM (Chowdhery et al. 2022) Table 1: 8.63B / 62.50B / 540.35B parameters."""
    cfg = presets.get(name)
    assert cfg.head_size == 256 and cfg.n_kv_heads == 1 and cfg.vocab_size == 256_000
    n = count_params(cfg)
    assert abs(n / 1e9 - float(paper_billions)) < 0.01
    # Exactly, to the paper's two decimals: the matmul and embedding weights. The norm
    # scales (118 x 18432 + 18432 at 540B) would tip 540.354 -> 540.356 -> "540.36".
    matmul_and_embedding = n - (cfg.n_layers + 1) * norm_params(cfg)
    assert f"{matmul_and_embedding / 1e9:.2f}" == paper_billions


def test_gpt2_small_has_124_439_808_parameters():
    """GPT-2 small (Radford et al. 2019), as counted by every reimplementation."""
    assert count_params(presets.get("gpt2-124m")) == 124_439_808


def test_gopher_shapes_follow_table_1():
    """Gopher (Rae et al. 2021) Table 1: layers, heads, key/value size, d_model."""
    shapes = {"gopher-44m": (8, 16, 32, 512), "gopher-117m": (12, 12, 64, 768),
              "gopher-417m": (12, 12, 128, 1536), "gopher-1.4b": (24, 16, 128, 2048),
              "gopher-7.1b": (32, 32, 128, 4096), "gopher-280b": (80, 128, 128, 16384)}
    for name, (layers, heads, kv, d) in shapes.items():
        cfg = presets.get(name)
        assert (cfg.n_layers, cfg.n_heads, cfg.head_size, cfg.d_model) == (layers, heads, kv, d)
        assert (cfg.norm, cfg.position, cfg.vocab_size) == ("rmsnorm", "relative", 32_000)
