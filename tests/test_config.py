import dataclasses

import pytest

from palmlite import ModelConfig

# (field expected in the message, changes): each is one kind of impossible config.
BAD_CONFIGS = [
    ("vocab_size", dict(vocab_size=0)),
    ("d_model", dict(d_model=-8)),
    ("n_layers", dict(n_layers=0)),
    ("n_heads", dict(n_heads=0)),
    ("n_kv_heads", dict(n_kv_heads=0)),
    ("n_kv_heads", dict(n_heads=4, n_kv_heads=3)),  # does not divide n_heads
    ("n_kv_heads", dict(n_heads=4, n_kv_heads=8)),  # more kv heads than query heads
    ("n_heads", dict(d_model=100, n_heads=8)),  # d_model not divisible, head_dim None
    ("head_dim", dict(head_dim=0)),
    ("head_dim", dict(head_dim=7, position="rope")),  # rope needs pairs
    ("d_ff", dict(d_ff=0)),
    ("max_seq_len", dict(max_seq_len=0)),
    ("norm", dict(norm="batchnorm")),
    ("activation", dict(activation="tanh")),
    ("block", dict(block="sandwich")),
    ("position", dict(position="absolute")),
    ("dtype", dict(dtype="float64")),
    ("param_dtype", dict(param_dtype="int8")),
    ("rope_theta", dict(rope_theta=0.0)),
    ("norm_eps", dict(norm_eps=-1e-6)),
    ("init_scale", dict(init_scale=0.0)),
    ("embed_init_std", dict(embed_init_std=-1.0)),
    ("d_model", dict(d_model=129, n_heads=3, position="sinusoidal")),  # odd width
    ("relative_buckets", dict(position="relative", relative_buckets=1)),
    ("relative_max_distance", dict(position="relative", relative_buckets=32,
                                   relative_max_distance=16)),
    ("d_model", dict(d_model=128.0)),  # wrong type
    ("n_layers", dict(n_layers=True)),  # a bool is not a layer count
    ("tie_embeddings", dict(tie_embeddings="yes")),
    ("rope_theta", dict(rope_theta=float("inf"))),
    ("attention_impl", dict(attention_impl="flash")),
    ("attention_impl", dict(attention_impl="cudnn")),  # needs a 16-bit dtype
    ("remat", dict(remat="some")),
]


@pytest.mark.parametrize("field,changes", BAD_CONFIGS, ids=[f"{f}-{i}" for i, (f, _) in
                                                             enumerate(BAD_CONFIGS)])
def test_bad_config_raises_value_error_naming_the_field(field, changes):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
        ModelConfig(**changes)


def test_unknown_string_lists_allowed_values():
    with pytest.raises(ValueError, match="rmsnorm.*layernorm"):
        ModelConfig(norm="batchnorm")


def test_replace_validates_and_rejects_unknown_fields():
    cfg = ModelConfig()
    assert cfg.replace(block="serial").block == "serial"
    assert cfg.block == "parallel"  # frozen: the original is untouched
    with pytest.raises(ValueError, match="n_kv_heads"):
        cfg.replace(n_kv_heads=3)
    with pytest.raises(ValueError, match="valid fields"):
        cfg.replace(n_layer=3)


def test_frozen():
    with pytest.raises(Exception):
        ModelConfig().d_model = 3


def test_head_size_resolution():
    assert ModelConfig(d_model=128, n_heads=4).head_size == 32
    assert ModelConfig(d_model=128, n_heads=4, head_dim=256).head_size == 256


def test_dict_round_trip():
    cfg = ModelConfig(position="alibi", n_kv_heads=2, head_dim=16)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert list(cfg.to_dict()) == [f.name for f in dataclasses.fields(ModelConfig)]
    with pytest.raises(ValueError, match="valid fields"):
        ModelConfig.from_dict({"d_modle": 3})
