"""Fuzzed bad input (issue 13): whatever a user types into an override, a study spec or a
corpus spec, palmlite answers with a ValueError (or FileNotFoundError) naming the problem,
never another exception. Hypothesis draws the inputs; the seeds are Hypothesis's own."""

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from palmlite import presets
from palmlite.config import ModelConfig, MoEConfig
from palmlite.corpora import arithmetic_corpus
from palmlite.studies import load_study
from palmlite.train_config import TrainConfig, parse_overrides

KEYS = ([f"model.{f.name}" for f in dataclasses.fields(ModelConfig)]
        + [f"model.moe.{f.name}" for f in dataclasses.fields(MoEConfig)]
        + [f"train.{f.name}" for f in dataclasses.fields(TrainConfig)])
VALUES = st.one_of(
    st.text(max_size=12), st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["null", "true", "false", "[]", "{}", '"x"', "1e400", "-0", "nan", "inf",
                     "bfloat16", "float16", "cudnn", "serial", "rope", "0.5", "2048"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_any_override_is_applied_or_refused_with_a_value_error(pairs):
    try:
        model, train = parse_overrides([f"{k}={v}" for k, v in pairs], presets.get("tiny"),
                                       TrainConfig())
    except ValueError:
        return
    assert isinstance(model, ModelConfig) and isinstance(train, TrainConfig)
    model.validate()  # what was accepted is a valid config
    train.validate()


FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(-1e3, 1e3),
                         st.text(max_size=8), st.lists(st.integers(-2, 2), max_size=3),
                         st.dictionaries(st.text(max_size=4), st.integers(0, 3), max_size=2))
SPEC_FIELDS = ["name", "notebook", "parameters", "grid", "seeds", "figures", "timeout_s",
               "description", "parts", "bogus"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(SPEC_FIELDS), FIELD_VALUES, max_size=6))
def test_any_spec_loads_or_is_refused_naming_the_file(tmp_path, fields):
    nb = tmp_path / "nb.ipynb"
    nb.write_text(json.dumps({"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]},
                                         "source": "x = 1\nseed = 0\n"}]}))
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"name": "s", "notebook": "nb.ipynb", **fields}))  # JSON is YAML
    try:
        study = load_study(spec)
    except (ValueError, FileNotFoundError) as e:
        assert str(spec) in str(e) or "notebook" in str(e)
        return
    assert len({study.key(p) for p in study.points()}) == len(study.points())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text("nsedopratiglmxu_", min_size=1, max_size=10),
                          st.text("0123456789-+*abc", max_size=4)), max_size=3))
def test_any_arithmetic_corpus_spec_builds_or_is_refused(options):
    spec = "arithmetic:" + ",".join(f"{k}={v}" for k, v in options)
    try:
        corpus = arithmetic_corpus(spec)
    except ValueError:
        return
    assert corpus.documents and all(isinstance(d, str) for d in corpus.documents)
