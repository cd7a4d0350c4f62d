import dataclasses
import re

import pytest

from palmlite import ModelConfig
from palmlite.config import TOGGLES
from palmlite.train_config import TrainConfig, parse_overrides, run_intervals

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


@pytest.mark.parametrize("field", TOGGLES)
def test_unknown_string_lists_allowed_values(field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}='nope'.*"
                                         + re.escape(str(TOGGLES[field]))):
        ModelConfig(**{field: "nope"})


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


# ---- the precision is the one source of the model's dtypes in training ------------------
def test_the_precision_owns_the_model_dtypes():
    """Default dtypes (float32) give way to the precision; agreeing ones are kept; any other
    raises naming both fields, instead of being silently replaced."""
    bf16 = TrainConfig(precision="bf16")
    assert bf16.model_dtypes(ModelConfig()) == dict(dtype="bfloat16", param_dtype="float32")
    assert bf16.model_dtypes(ModelConfig(dtype="bfloat16")) == bf16.dtypes
    both = r"ModelConfig\.dtype='bfloat16' disagrees with TrainConfig\.precision='float32'"
    with pytest.raises(ValueError, match=both + ".*set train.precision instead"):
        TrainConfig().model_dtypes(ModelConfig(dtype="bfloat16"))
    with pytest.raises(ValueError, match=r"ModelConfig\.param_dtype='bfloat16'.*precision='bf16'"):
        bf16.model_dtypes(ModelConfig(dtype="bfloat16", param_dtype="bfloat16"))


def test_overrides_of_the_model_dtypes_must_agree_with_the_precision():
    model, train = ModelConfig(), TrainConfig()
    with pytest.raises(ValueError, match=r"ModelConfig\.dtype='bfloat16' disagrees with "
                                         r"TrainConfig\.precision='float32' \(which sets "
                                         r"dtype='float32', param_dtype='float32'\)"):
        parse_overrides(["model.dtype=bfloat16"], model, train)
    with pytest.raises(ValueError, match=r"ModelConfig\.dtype='float32' disagrees.*'bf16'"):
        parse_overrides(["model.dtype=float32", "train.precision=bf16"], model, train)
    with pytest.raises(ValueError, match=r"ModelConfig\.dtype='float64' is invalid"):
        parse_overrides(["model.dtype=float64"], model, train)  # an invalid value says so
    cfg, tc = parse_overrides(["model.param_dtype=bfloat16", "train.precision=pure_bf16"],
                              model, train)
    assert (cfg.dtype, cfg.param_dtype, tc.precision) == ("bfloat16", "bfloat16", "pure_bf16")
    cfg, _ = parse_overrides(["train.precision=bf16"], model, train)  # the precision alone
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")


# ---- run_intervals: warm-up, evaluations and log lines that scale with the run ------------
@pytest.mark.parametrize("steps", [1, 4, 12, 30, 48, 240, 600, 1000, 12_345])
def test_run_intervals_scale_with_the_run(steps):
    intervals = run_intervals(steps)
    assert set(intervals) == {"warmup_steps", "eval_every", "log_every"}
    assert all(isinstance(v, int) and v >= 1 for v in intervals.values())
    TrainConfig(steps=steps, **intervals)  # a valid training configuration

    def count(every):  # the train loop acts on multiples of `every`, and at the last step
        return steps // every + (steps % every != 0)
    block = TrainConfig().steps_per_call
    if steps >= 100:
        assert intervals["warmup_steps"] == pytest.approx(steps / 10, abs=1)  # 10%
        assert count(intervals["eval_every"]) in (5, 6)
        assert 8 <= count(intervals["log_every"]) <= 15
    if steps >= 4 * block:  # syncs fall between whole compiled blocks of steps
        assert intervals["eval_every"] % block == 0 and intervals["log_every"] % block == 0
    assert count(intervals["eval_every"]) <= 6 and count(intervals["log_every"]) <= 15
    assert intervals["warmup_steps"] <= steps


def test_run_intervals_examples_and_bad_input():
    assert run_intervals(240) == dict(warmup_steps=24, eval_every=40, log_every=20)
    assert run_intervals(30) == dict(warmup_steps=3, eval_every=5, log_every=2)
    assert run_intervals(1) == dict(warmup_steps=1, eval_every=1, log_every=1)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match=r"run_intervals\.total_steps=.* positive integer"):
            run_intervals(bad)
