"""RETRO trained end to end: batches with neighbours, evaluation with retrieval on and off,
RETRO-fitting a trained run (its base parameters never move), the leakage evaluation."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from palmlite import retro
from palmlite.config import ModelConfig, RetroConfig
from palmlite.evaluate import chunk_losses, leakage_curve, target_overlap
from palmlite.model import Transformer
from palmlite.train import datasets, load_run, train
from palmlite.train_config import TrainConfig

M = 8
BASE = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=32)
RETRO = BASE.replace(retro=RetroConfig(chunk_size=M, encoder_d_model=16))


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("PALMLITE_CACHE", str(tmp_path / "cache"))
    docs = tmp_path / "docs"
    docs.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    for i in range(16):  # documents that share phrases: something to retrieve
        text = " ".join(f"{words[(i + j) % 6]} {words[(i * j) % 6]} {j % 7}" for j in range(40))
        (docs / f"{i:02d}.txt").write_text(text)
    return str(docs)


def config(corpus, **changes):
    base = dict(corpus=corpus, tokenizer="bytes", steps=20, batch_size=4, seq_len=32, lr=1e-2,
                warmup_steps=2, log_every=10, eval_every=10, eval_batches=2, checkpoint_every=10,
                quiet=True, val_fraction=0.2)
    return TrainConfig(**{**base, **changes})


def test_retro_trains_and_reports_both_validation_losses(corpus, tmp_path):
    result = train(RETRO, config(corpus), out=tmp_path / "run")
    last = result.metrics[-1]
    assert np.isfinite(last["loss"]) and last["loss"] < result.metrics[0]["loss"] + 1
    assert {"val_loss", "val_loss_no_retrieval", "val_bits_per_byte_no_retrieval"} <= set(last)
    assert last["val_loss"] != last["val_loss_no_retrieval"]
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    assert info["retrieval"]["chunks"] > 0 and "bm25" in info["retrieval"]["retriever"]
    assert info["model"]["retro"]["chunk_size"] == M


def test_retrofit_trains_only_cca_and_encoder(corpus, tmp_path):
    train(BASE, config(corpus), out=tmp_path / "base")
    base_model, _, _ = load_run(tmp_path / "base")
    fit = train(RETRO, config(corpus, retrofit=str(tmp_path / "base"), steps=10),
                out=tmp_path / "fit")
    base_state = nnx.state(base_model, nnx.Param)
    fit_state = nnx.state(fit.model, nnx.Param)
    moved = []
    for path, value in jax.tree_util.tree_flatten_with_path(fit_state)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
        if retro.retro_trainable(keys):
            moved.append(keys)
    assert moved  # the encoder and the CCA layer are there, and trained
    # Every base parameter is bit-identical after training; the retrieval ones moved.
    flat_base = dict(jax.tree_util.tree_flatten_with_path(base_state)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(fit_state)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
        if not retro.retro_trainable(keys):
            np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_base[path]))
    cca_out = fit.model.blocks[0].cca.attn.o.kernel[...]
    assert np.abs(np.asarray(cca_out)).max() > 0  # started at zero, trained away from it
    # retrieval off: exactly the base model
    tokens = np.arange(32, dtype=np.int32)[None] % 200
    np.testing.assert_array_equal(np.asarray(fit.model(tokens)), np.asarray(base_model(tokens)))


def test_retrofit_refuses_a_base_with_another_decoder(corpus, tmp_path):
    train(BASE.replace(d_ff=48), config(corpus, steps=10), out=tmp_path / "base")
    with pytest.raises(ValueError, match=r"TrainConfig.retrofit=.*'d_ff': \(48, 64\)"):
        train(RETRO, config(corpus, retrofit=str(tmp_path / "base"), steps=10))


def test_leakage_curve_at_alpha_one_is_the_mean_chunk_loss(corpus):
    from palmlite import retro_data
    tc = config(corpus)
    _, _, train_ds, val_ds = datasets(tc)
    data = retro_data.for_training(RETRO.retro, tc, train_ds, val_ds)
    windows = data.windows(val_ds, 32)
    model = retro.retrofit(Transformer(BASE.replace(vocab_size=259), rngs=nnx.Rngs(0)),
                           RETRO.retro)
    losses = {"on": chunk_losses(model, windows, M), "off": chunk_losses(model, windows, M,
                                                                         retrieval=False)}
    np.testing.assert_allclose(losses["on"], losses["off"], rtol=1e-6)  # zero CCA output
    overlap = target_overlap(windows, M)
    assert overlap.shape == losses["on"].shape and 0 <= overlap.min() and overlap.max() <= 1
    curve = {row["alpha"]: row for row in leakage_curve(losses, overlap, alphas=(0.0, 0.5, 1.0))}
    assert curve[1.0]["fraction"] == 1.0
    assert curve[1.0]["on"] == pytest.approx(float(losses["on"].mean()))
    kept = overlap <= 0.5
    assert curve[0.5]["chunks"] == kept.sum()
    assert curve[0.5]["off"] == pytest.approx(float(losses["off"][kept].mean()))
    assert (0.0 in curve) == bool((overlap == 0).any())  # no chunk, no row


def test_cli_trains_a_retro_run_and_generates_with_its_database(corpus, tmp_path, capsys):
    from palmlite import cli
    from palmlite.generate import generate
    run = str(tmp_path / "run")
    assert cli.main(["train", "--preset", "tiny-retro", "--corpus", corpus, "--tokenizer", "bytes",
                     "--steps", "10", "--out", run, "--quiet", "--set", "model.retro.chunk_size=8",
                     "--set", "train.seq_len=32", "--set", "train.batch_size=4",
                     "--set", "train.val_fraction=0.2", "--set", "train.eval_batches=1"]) == 0
    capsys.readouterr()
    generate_args = ["generate", "--run", run, "--prompt", "alpha beta", "--max-new-tokens", "20",
                     "--temperature", "0"]
    assert cli.main(generate_args) == 0 and capsys.readouterr().out.strip()
    assert cli.main(generate_args + ["--no-retrieval"]) == 0 and capsys.readouterr().out.strip()
    model, tokenizer, info = load_run(run)
    from palmlite.retro_data import RetroData
    data = RetroData.of_run(info)  # the run's own database, keys and index
    assert data.retriever.fingerprint == info["retrieval"]["fingerprint"]
    chunk = data.db.chunks(np.array([5]))
    ids = data.retriever.search(chunk, 2)
    np.testing.assert_array_equal(data.retrieve(chunk), data.db.values(ids, 2 * M))
    with pytest.raises(ValueError, match="RETRO model .* generates with retrieval"):
        generate(model, tokenizer, "alpha")
