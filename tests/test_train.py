import json
import math
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from palmlite import ModelConfig, cli
from palmlite import train as train_module
from palmlite.data import Batches
from palmlite.schedules import make_schedule
from palmlite.checkpoint import Checkpointer
from palmlite.train import init_state, load_run, train
from palmlite.train_config import TrainConfig, parse_overrides

MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=32)


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("PALMLITE_CACHE", str(tmp_path / "cache"))
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):  # repetitive text: a tiny model learns it quickly
        (docs / f"{i:02d}.txt").write_text("the cat sat on the mat. " * (20 + i))
    return str(docs)


def config(corpus, **changes):
    base = dict(corpus=corpus, tokenizer="bytes", steps=40, batch_size=4, seq_len=32, lr=1e-2,
                warmup_steps=5, log_every=10, eval_every=20, eval_batches=2, checkpoint_every=20,
                quiet=True, val_fraction=0.2)
    return TrainConfig(**{**base, **changes})


def params(model):
    return jax.tree.leaves(nnx.state(model))


def test_loss_falls_and_metrics_are_recorded(corpus, tmp_path, capsys):
    result = train(MODEL, config(corpus, steps=60), out=tmp_path / "run")
    # MODEL's vocab_size (the default 8192) became the byte tokenizer's 259: said, and kept.
    assert "model: vocab_size 8192 -> 259 (to fit the tokenizer bytes and seq_len 32)" in capsys.readouterr().out
    losses = [m["loss"] for m in result.metrics]
    assert losses[-1] < losses[0] - 1.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == result.metrics and [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    last = rows[-1]
    assert last["tokens"] == 60 * 4 * 32 and last["tokens_per_s"] > 0
    assert last["mfu"] is None and last["hfu"] is None  # a CPU has no published peak: no made-up number
    assert "val_loss" in last and "val_loss" not in rows[0]
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    bytes_per_token = info["data"]["train"]["bytes_per_token"]  # < 1: EOS between documents
    assert 0.9 < bytes_per_token < 1
    assert math.isclose(last["bits_per_byte"], last["loss"] / math.log(2) / bytes_per_token)
    assert info["model"]["vocab_size"] == 259 and info["train"]["steps"] == 60
    assert info["replaced"] == {"vocab_size": [8192, 259]}
    assert info["data"]["tokenizer"]["fingerprint"] and info["data"]["corpus"]["fingerprint"]
    assert info["device"]["platform"] == "cpu" and info["versions"]["jax"] == jax.__version__


def test_interrupted_run_resumes_bit_identical(corpus, tmp_path, monkeypatch):
    tc = config(corpus)
    whole = train(MODEL, tc, out=tmp_path / "whole")
    get = Batches.get

    def killed_at_25(self, step, rows=slice(None)):
        if step == 25:
            raise KeyboardInterrupt
        return get(self, step, rows)

    monkeypatch.setattr(Batches, "get", killed_at_25)
    with pytest.raises(KeyboardInterrupt):
        train(MODEL, tc, out=tmp_path / "split")
    monkeypatch.setattr(Batches, "get", get)
    resumed = train(MODEL, tc, out=tmp_path / "split", resume=True)
    for a, b in zip(params(whole.model), params(resumed.model)):
        np.testing.assert_array_equal(a, b)
    assert resumed.metrics == [] or [m["loss"] for m in resumed.metrics] == \
        [m["loss"] for m in whole.metrics]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [10, 20, 30, 40]  # no duplicates


def test_stop_after_then_resume_equals_the_whole_run(corpus, tmp_path):
    """stop_after interrupts a run on purpose (checkpointed, evaluated) with the whole run's
    schedule, so the resumed run ends bit-identical; training half the steps and resuming
    with more would have trained the first half on a shorter cosine."""
    tc = config(corpus)
    whole = train(MODEL, tc, out=tmp_path / "whole")
    half = train(MODEL, tc.replace(stop_after=20), out=tmp_path / "split")
    assert half.metrics[-1]["step"] == 20 and "val_loss" in half.metrics[-1]
    resumed = train(MODEL, tc, out=tmp_path / "split", resume=True)
    for a, b in zip(params(whole.model), params(resumed.model)):
        np.testing.assert_array_equal(a, b)
    assert [m["lr"] for m in resumed.metrics] == [m["lr"] for m in whole.metrics]
    with pytest.raises(ValueError, match="stop_after=50 is invalid"):
        tc.replace(stop_after=50)


def test_existing_run_needs_resume_and_unchanged_settings(corpus, tmp_path):
    tc = config(corpus, steps=20)
    train(MODEL, tc, out=tmp_path / "run")
    with pytest.raises(ValueError, match="resume"):
        train(MODEL, tc, out=tmp_path / "run")
    with pytest.raises(ValueError, match="lr"):
        train(MODEL, tc.replace(lr=1e-3), out=tmp_path / "run", resume=True)
    with pytest.raises(FileNotFoundError, match="config.json"):
        train(MODEL, tc, out=tmp_path / "nothing", resume=True)


def test_damaged_newest_checkpoint_falls_back_to_the_previous(corpus, tmp_path):
    train(MODEL, config(corpus), out=tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["20", "40"]
    shutil.rmtree(ckpts / "40" / "state")  # a damaged newest checkpoint
    with pytest.warns(RuntimeWarning, match="step 40"):
        model, tokenizer, _ = load_run(tmp_path / "run")
    assert tokenizer.vocab_size == 259 and model.cfg.vocab_size == 259


def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes(corpus, tmp_path):
    """Issue 13: resuming fell back to step 20, retrained, then failed on every attempt with
    "Checkpoint for step 40 already exists". The damaged step is moved aside and kept."""
    run = tmp_path / "run"
    train(MODEL, config(corpus), out=run)
    shutil.rmtree(run / "checkpoints" / "40" / "state")
    with pytest.warns(RuntimeWarning, match="step 40 .* moved to"):
        result = train(MODEL, config(corpus, steps=60), out=run, resume=True)
    assert result.metrics[-1]["step"] == 60
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == \
        ["40", "60"]  # keep_checkpoints=2
    (kept,) = (run / "checkpoints-damaged").iterdir()
    assert kept.name.startswith("40-")
    for step in ("40", "60"):  # every checkpoint damaged: a clear error, no restart
        shutil.rmtree(run / "checkpoints" / step / "state")
    with pytest.warns(RuntimeWarning), pytest.raises(FileNotFoundError,
                                                     match="no readable checkpoint"):
        train(MODEL, config(corpus, steps=80), out=run, resume=True)


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_and_the_run_resumes(corpus, tmp_path):
    """Issue 13, item 11: a kill while a metrics line was written left half a line, and
    every later resume failed on it."""
    run = tmp_path / "run"
    train(MODEL, config(corpus), out=run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 50, "lo')
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        result = train(MODEL, config(corpus, steps=60), out=run, resume=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60] == [m["step"] for m in result.metrics]


def test_resume_refuses_a_changed_corpus_naming_both_fingerprints(corpus, tmp_path):
    """Issue 13: a changed corpus directory was retrained on under the old embeddings."""
    run = tmp_path / "run"
    train(MODEL, config(corpus), out=run)
    before = (run / "config.json").read_text()
    (Path(corpus) / "00.txt").write_text("a different document. " * 30)
    saved = json.loads(before)["data"]["corpus"]["fingerprint"][:12]
    with pytest.raises(ValueError, match=f"its corpus was .*{saved}.* is now .*fingerprint"):
        train(MODEL, config(corpus, steps=60), out=run, resume=True)
    assert (run / "config.json").read_text() == before  # nothing overwritten


def test_a_second_trainer_on_a_run_directory_in_use_gets_a_clear_error(corpus, tmp_path):
    """Issue 13: two trainers on one --out interleaved metrics.jsonl and crashed in orbax."""
    import subprocess
    import sys
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom filelock import FileLock\n"
        "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(60)"),
        str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match="in use by another trainer"):
            train(MODEL, config(corpus), out=run)
        assert not (run / "config.json").exists()  # nothing touched
    finally:
        holder.kill()
        holder.wait()
    train(MODEL, config(corpus, steps=20), out=run)  # released when its holder died


def test_nan_guard_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        corpus, tmp_path, monkeypatch):
    # Inject a NaN at step 7: a batch marked with -1 tokens makes the loss non-finite.
    get = Batches.get
    monkeypatch.setattr(train_module, "compute_loss", _poison_on_marker(train_module.compute_loss))
    monkeypatch.setattr(Batches, "get",
                        lambda self, step, rows=slice(None): get(self, step, rows) if step != 7
                        else -np.ones_like(get(self, step, rows)))
    with pytest.raises(FloatingPointError, match="step 7.*step 5"):
        train(MODEL, config(corpus, checkpoint_every=5, log_every=5), out=tmp_path / "run")
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 5


@pytest.mark.parametrize("changes", [
    dict(optimizer="sgd", lr=1e30, grad_clip=0.0),  # a finite loss, then infinite parameters
    dict(lr=1e30, warmup_steps=0, grad_clip=0.0, weight_decay=1e30),
])
def test_nan_guard_refuses_an_update_that_makes_the_parameters_non_finite(corpus, tmp_path,
                                                                          changes):
    """Issue 13: the guard looked only at the loss, so a step whose loss was finite but
    whose update made the parameters inf/NaN was checkpointed and called "last good"."""
    with pytest.raises(FloatingPointError, match=r"non-finite loss or update at step \d"):
        train(MODEL, config(corpus, checkpoint_every=1, log_every=1, steps=6, **changes),
              out=tmp_path / "run")
    target = init_state(MODEL.replace(vocab_size=259), config(corpus, **changes))[3]
    restored = Checkpointer(tmp_path / "run" / "checkpoints", keep=3).restore_latest(target)
    if restored is not None:  # whatever was saved is finite
        assert all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(restored[1]["params"]))


def _poison_on_marker(loss):
    """compute_loss returning NaN for a batch of -1 tokens (the test's injected fault)."""
    def poisoned(model, batch, z):
        total, aux = loss(model, jax.numpy.maximum(batch, 0), z)
        return jax.numpy.where(batch[0, 0] < 0, jax.numpy.nan, total), aux
    return poisoned


def test_gopher_and_palm_schedules():
    """Gopher: warm-up from 1e-7, cosine to 10% of the peak. PaLM: constant, then 1/sqrt(step)."""
    gopher = make_schedule("warmup_cosine", 2e-4, total_steps=10_000, warmup_steps=1500)
    assert float(gopher(0)) == pytest.approx(1e-7)
    assert float(gopher(1500)) == pytest.approx(2e-4)
    assert float(gopher(10_000)) == pytest.approx(2e-5)
    palm = make_schedule("rsqrt", 1e-2, total_steps=100_000, warmup_steps=10_000)
    assert float(palm(0)) == float(palm(10_000)) == pytest.approx(1e-2)
    assert float(palm(40_000)) == pytest.approx(1e-2 / 2)


def test_train_config_validation():
    with pytest.raises(ValueError, match="TrainConfig.steps"):
        TrainConfig(steps=10, tokens=1000)
    with pytest.raises(ValueError, match="TrainConfig.optimizer"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="TrainConfig.precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="TrainConfig.tokenizer"):
        TrainConfig(tokenizer="bpe:lots")
    with pytest.raises(ValueError, match="TrainConfig.tokenizer='bpe:512:split'.*nosplit"):
        TrainConfig(tokenizer="bpe:512:split")
    assert TrainConfig(tokenizer="unigram:512:nosplit").tokenizer == "unigram:512:nosplit"
    assert TrainConfig(steps=None, tokens=1000, batch_size=4, seq_len=32).total_steps == 8


def test_overrides_are_typed_and_validated():
    cfg, tc = parse_overrides(["model.block=serial", "train.lr=3e-4", "model.n_kv_heads=4",
                               "model.tie_embeddings=false"], MODEL.replace(n_heads=4), TrainConfig())
    assert (cfg.block, cfg.n_kv_heads, cfg.tie_embeddings, tc.lr) == ("serial", 4, False, 3e-4)
    with pytest.raises(ValueError, match="model.block"):  # the message lists the valid keys
        parse_overrides(["model.blocks=serial"], MODEL, TrainConfig())
    with pytest.raises(ValueError, match="ModelConfig.norm"):
        parse_overrides(["model.norm=batchnorm"], MODEL, TrainConfig())
    # The precision sets the model's dtypes first, so a bf16-only toggle validates with it.
    cfg, _ = parse_overrides(["model.attention_impl=cudnn", "train.precision=bf16"], MODEL, TrainConfig())
    assert (cfg.attention_impl, cfg.dtype, cfg.param_dtype) == ("cudnn", "bfloat16", "float32")
    with pytest.raises(ValueError, match="ModelConfig.attention_impl"):
        parse_overrides(["model.attention_impl=cudnn"], MODEL, TrainConfig())


def test_cli_train_then_generate(corpus, tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["train", "--preset", "tiny", "--corpus", corpus, "--tokenizer", "bytes", "--steps", "20",
            "--out", out, "--quiet", "--set", "train.batch_size=4", "--set", "train.seq_len=32",
            "--set", "model.block=serial", "--set", "train.log_every=10"]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["block"] == "serial"
    assert cli.main(argv[:-2] + ["--set", "train.nope=1"]) == 2
    assert "train.lr" in capsys.readouterr().err  # the error lists valid keys
    assert cli.main(["generate", "--run", out, "--prompt", "the cat", "--max-new-tokens", "8",
                     "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


def test_tokens_per_second_is_measured_after_the_steps_finished(corpus, tmp_path, monkeypatch):
    """JAX dispatches steps asynchronously: the interval's clock must stop only once its
    results are on the host. Fetching is made to take 50 ms, which the rate must include."""
    device_get = jax.device_get

    def slow_device_get(x):
        time.sleep(0.05)
        return device_get(x)

    monkeypatch.setattr(train_module.jax, "device_get", slow_device_get)
    result = train(MODEL, config(corpus, steps=20, checkpoint_every=0), out=None)
    assert max(m["tokens_per_s"] for m in result.metrics) < 10 * 4 * 32 / 0.05


def test_mesh_is_checked_before_the_run_directory_is_touched(corpus, tmp_path):
    with pytest.raises(ValueError, match="needs 4 devices but 1 are available"):
        train(MODEL, config(corpus, mesh="data=2,tensor=2"), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_model_dtype_that_disagrees_with_the_precision_raises_before_any_work(tmp_path):
    """train() used to replace ModelConfig.dtype='bfloat16' by the precision's float32
    silently; now it names both fields, before it even looks for the corpus."""
    missing = config(str(tmp_path / "no-such-corpus"))
    with pytest.raises(ValueError, match=r"ModelConfig\.dtype='bfloat16' disagrees with "
                                         r"TrainConfig\.precision='float32'"):
        train(MODEL.replace(dtype="bfloat16"), missing)
    with pytest.raises(Exception, match="no-such-corpus"):  # agreeing dtypes get that far
        train(MODEL.replace(dtype="bfloat16"), missing.replace(precision="bf16"))


# ---- several optimizer steps per compiled call ----------------------------------------------
@pytest.mark.parametrize("steps_per_call", [4, 7])
def test_blocks_of_steps_give_the_one_step_parameters_and_metrics(corpus, steps_per_call):
    """A lax.scan over a block of batches is the same training as one step per call: with
    k=4 every sync falls between blocks; with k=7 the loop mixes blocks and single steps
    (40 steps, syncs every 10: 7 + 3 singles, ...)."""
    one = train(MODEL, config(corpus, steps_per_call=1))
    many = train(MODEL, config(corpus, steps_per_call=steps_per_call))
    for a, b in zip(params(one.model), params(many.model)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    keys = ("step", "tokens", "loss", "z_loss", "grad_norm", "lr", "val_loss")
    for m1, mk in zip(one.metrics, many.metrics, strict=True):
        assert m1.keys() == mk.keys()
        for key in set(keys) & m1.keys():
            assert m1[key] == pytest.approx(mk[key], rel=1e-5), key


def test_a_resumed_run_may_change_steps_per_call(corpus, tmp_path, monkeypatch):
    whole = train(MODEL, config(corpus, steps_per_call=1))
    get = Batches.get

    def killed_at_30(self, step, rows=slice(None)):  # in the block of steps 30..39
        if step == 30:
            raise KeyboardInterrupt
        return get(self, step, rows)

    monkeypatch.setattr(Batches, "get", killed_at_30)
    with pytest.raises(KeyboardInterrupt):
        train(MODEL, config(corpus, steps_per_call=10), out=tmp_path / "run")
    monkeypatch.setattr(Batches, "get", get)
    resumed = train(MODEL, config(corpus, steps_per_call=3), out=tmp_path / "run", resume=True)
    for a, b in zip(params(whole.model), params(resumed.model)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_the_summary_splits_the_time_and_counts_compilations(corpus):
    summary = train(MODEL, config(corpus)).summary()
    assert set(summary["seconds"]) == {"setup", "compile", "training", "evaluation", "checkpoint"}
    assert summary["seconds_training"] == pytest.approx(summary["seconds"]["training"], abs=1e-3)
    assert summary["seconds_training"] > 0
    assert set(summary["compilation_cache"]) == {"requests", "hits"}
    assert summary["compilation_cache"]["requests"] >= 1  # the persistent cache is on


def test_every_training_seed_is_scored_on_one_validation_split(corpus):
    """Seeds differ in init and data order, not in the documents held out (split_seed)."""
    info = lambda **kw: train(MODEL, config(corpus, steps=2, eval_every=0, **kw)).info["data"]
    a, b, c = info(seed=0), info(seed=1), info(seed=0, split_seed=1)
    assert a["validation"] == b["validation"] and a["train"] == b["train"]
    assert c["validation"] != a["validation"]
