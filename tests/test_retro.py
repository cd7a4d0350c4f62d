"""RETRO's model side: chunked cross-attention's causality, retrieval off = the base model,
cached generation = recomputation, exact accounting, the paper's sizes, clear errors."""

import dataclasses
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from palmlite import presets, retro
from palmlite.accounting import (count_params, embedding_params, flops_per_token,
                                 retro_flops_per_token, retro_params)
from palmlite.config import ModelConfig, RetroConfig
from palmlite.generate import retro_generate_tokens
from palmlite.model import Transformer
from palmlite.train_config import TrainConfig, parse_overrides

M, J = 8, 2  # chunk size, neighbours


def small(**retro_fields) -> ModelConfig:
    fields = dict(chunk_size=M, n_neighbours=J, cca_layers=(2, 3)) | retro_fields
    return ModelConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64,
                       max_seq_len=64, retro=RetroConfig(**fields))


def random_neighbours(key, B, T, cfg):
    return jax.random.randint(jax.random.key(key), (B, T // M, J, cfg.retro.neighbour_len), 0,
                              cfg.vocab_size)


def fake_retrieve(chunk_BxM: np.ndarray, R: int = 2 * M) -> np.ndarray:
    """A deterministic stand-in for a database: neighbours that depend on the chunk."""
    s_Bx1x1 = chunk_BxM.sum(1)[:, None, None]
    return ((7 * s_Bx1x1 + 3 * np.arange(J)[:, None] + np.arange(R)) % 50).astype(np.int32)


@pytest.mark.parametrize("block", ["parallel", "serial"])
def test_a_token_reads_only_the_neighbours_of_chunks_it_has_seen_whole(block):
    cfg = small().replace(block=block)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    B, T = 2, 32
    tokens_BxT = jax.random.randint(jax.random.key(1), (B, T), 0, 50)
    nbr = random_neighbours(2, B, T, cfg)
    logits = model(tokens_BxT, neighbours=nbr)
    for u in range(T // M):  # RETRO §2.4: chunk u's neighbours reach tokens from u·M + M - 1 on
        changed = model(tokens_BxT, neighbours=nbr.at[:, u].set((nbr[:, u] + 1) % 50))
        moved_T = np.asarray(jnp.abs(changed - logits).max(axis=(0, 2))) > 0
        assert not moved_T[:u * M + M - 1].any()
        assert moved_T[u * M + M - 1]  # the chunk's last token reads them first


def test_retrofit_starts_at_the_base_model_and_retrieval_off_is_the_base_model_exactly():
    cfg = small()
    base = Transformer(cfg.replace(retro=None), rngs=nnx.Rngs(0))
    model = retro.retrofit(base, cfg.retro, seed=1)
    tokens_BxT = jax.random.randint(jax.random.key(1), (2, 32), 0, 50)
    expected = np.asarray(base(tokens_BxT))
    np.testing.assert_array_equal(np.asarray(model(tokens_BxT)), expected)  # bit for bit
    # CCA's output projection starts at zero: with retrieval on too, the base's logits
    on = model(tokens_BxT, neighbours=random_neighbours(2, 2, 32, cfg))
    np.testing.assert_array_equal(np.asarray(on), expected)


@pytest.mark.parametrize("fields", [dict(), dict(continuation=False, query_conditioning=False),
                                    dict(shared_embeddings=True, cca_layers=(1,))])
@pytest.mark.parametrize("block", ["parallel", "serial"])
def test_cached_generation_with_retrieval_equals_recomputation(fields, block):
    cfg = small(**fields).replace(block=block)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    R = cfg.retro.neighbour_len
    prompt_BxT = np.asarray(jax.random.randint(jax.random.key(3), (2, 11), 0, 50))
    out = retro_generate_tokens(model, prompt_BxT, lambda c: fake_retrieve(c, R),
                                max_new_tokens=20, temperature=0.0, return_logits=True)
    sequence = np.concatenate([prompt_BxT, np.asarray(out.tokens_BxN), np.zeros((2, 1), int)], 1)
    nbr = np.stack([fake_retrieve(sequence[:, u * M:(u + 1) * M], R) for u in range(4)], 1)
    full = model(jnp.asarray(sequence), neighbours=jnp.asarray(nbr))
    np.testing.assert_allclose(np.asarray(out.logits_BxNxV), np.asarray(full[:, 10:30]),
                               atol=2e-5)


def test_generation_retrieves_once_per_completed_chunk():
    cfg = small()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    seen = []
    retrieve = lambda c: (seen.append(c.copy()), fake_retrieve(c))[1]
    prompt = np.arange(1, 12, dtype=np.int32)[None]  # 11 tokens: chunk 0 complete
    out = retro_generate_tokens(model, prompt, retrieve, max_new_tokens=20, temperature=0.0)
    sequence = np.concatenate([prompt, np.asarray(out.tokens_BxN)], 1)  # 31 tokens: chunks 0..2
    assert len(seen) == 3
    for u, chunk in enumerate(seen):
        np.testing.assert_array_equal(chunk, sequence[:, u * M:(u + 1) * M])


def _random_retro_config(rng: random.Random) -> ModelConfig:
    n_layers = rng.randint(1, 4)
    n_heads = rng.choice([2, 4])
    retro_fields = dict(chunk_size=rng.choice([4, 8]), n_neighbours=rng.randint(1, 3),
                        continuation=rng.random() < 0.5, encoder_layers=rng.randint(1, 2),
                        query_conditioning=rng.random() < 0.5,
                        cca_layers=rng.choice([None, (n_layers,)]))
    if rng.random() < 0.5:
        retro_fields["shared_embeddings"] = True
    else:
        retro_fields |= dict(encoder_d_model=rng.choice([None, 24]),
                             encoder_d_ff=rng.choice([None, 40]))
    return ModelConfig(
        vocab_size=rng.choice([37, 64]), d_model=32, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=rng.choice([1, n_heads]), d_ff=rng.choice([48, 64]), max_seq_len=32,
        norm=rng.choice(["rmsnorm", "layernorm"]), use_bias=rng.random() < 0.5,
        activation=rng.choice(["swiglu", "gelu"]), block=rng.choice(["parallel", "serial"]),
        tie_embeddings=rng.random() < 0.5, retro=RetroConfig(**retro_fields))


def test_parameter_count_matches_the_built_model_for_random_retro_configs():
    rng = random.Random(0)
    for _ in range(12):
        cfg = _random_retro_config(rng)
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        built = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert built == count_params(cfg), cfg
        encoder = nnx.state(model.encoder, nnx.Param)
        extra = retro_params(cfg)
        assert sum(x.size for x in jax.tree.leaves(encoder)) == \
            extra["encoder"] + extra["encoder_embedding"]


def test_retro_table_2_sizes_132m_and_172m():
    """RETRO Table 2 (non-embedding): baseline 132M, RETRO 172M at 12 layers of width 896.
    Gopher's Transformer-XL attention has one D x (16 x 64) relative-position projection per
    decoder layer, which palmlite's T5-style bias table replaces: adding it back gives the
    paper's counts."""
    base, model = presets.get("retro-132m"), presets.get("retro-172m")
    xl_projections = 12 * 896 * 16 * 64
    non_embedding = lambda cfg: count_params(cfg) - embedding_params(cfg) + xl_projections
    assert non_embedding(base) == pytest.approx(132e6, rel=0.005)
    assert non_embedding(model) == pytest.approx(172e6, rel=0.01)
    assert model.retro.layers(12) == (6, 9, 12)  # Table 10


def test_retro_flops_match_the_matmuls_xla_counts():
    """The forward with retrieval minus the forward without it, counted by XLA, is a third
    of the training FLOPs ``retro_flops_per_token`` and the CCA weights add (within the
    elementwise work XLA also counts)."""
    cfg = small(cca_layers=(2,)).replace(d_model=64, d_ff=256, n_heads=4, n_kv_heads=4)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    B, T = 4, 32
    tokens = jnp.zeros((B, T), jnp.int32)
    nbr = jnp.zeros((B, T // M, J, cfg.retro.neighbour_len), jnp.int32)
    graphdef, state = nnx.split(model)
    cost = lambda *a: jax.jit(lambda s, *x: nnx.merge(graphdef, s)(*x)).lower(
        state, *a).compile().cost_analysis()["flops"]
    measured = cost(tokens, None, None, nbr) - cost(tokens)
    cca_weights = retro_params(cfg)["cca"]
    predicted = B * T * (retro_flops_per_token(cfg) + 6 * cca_weights) / 3
    assert measured == pytest.approx(predicted, rel=0.12)
    assert flops_per_token(cfg, T) - flops_per_token(cfg.replace(retro=None), T) == \
        pytest.approx(retro_flops_per_token(cfg) + 6 * cca_weights)


@pytest.mark.parametrize("make, field", [
    (lambda: RetroConfig(n_neighbours=0), "RetroConfig.n_neighbours"),
    (lambda: RetroConfig(chunk_size=0), "RetroConfig.chunk_size"),
    (lambda: RetroConfig(cca_layers=(3, 1)), "RetroConfig.cca_layers"),
    (lambda: RetroConfig(encoder_layers=-1), "RetroConfig.encoder_layers"),
    (lambda: ModelConfig(n_layers=4, retro=RetroConfig(cca_layers=(5,))),
     "ModelConfig.retro.cca_layers"),
    (lambda: ModelConfig(retro=RetroConfig(shared_embeddings=True, encoder_d_model=64)),
     "ModelConfig.retro.encoder_d_model"),
    (lambda: TrainConfig(seq_len=100).check_retro(ModelConfig(retro=RetroConfig())),
     "TrainConfig.seq_len"),
    (lambda: TrainConfig(retrofit="runs/x").check_retro(ModelConfig()), "TrainConfig.retrofit"),
    (lambda: parse_overrides(["model.retro.chunk_size=abc"], ModelConfig(), TrainConfig()),
     "RetroConfig.chunk_size"),
])
def test_invalid_retro_settings_name_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_a_sequence_that_is_not_whole_chunks_is_refused_before_tracing():
    cfg = small()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiple of chunk_size=8"):
        model(jnp.zeros((1, 30), jnp.int32), neighbours=jnp.zeros((1, 3, J, 16), jnp.int32))
    with pytest.raises(ValueError, match=r"\(1, 4, 2, 16\)"):  # the wrong number of neighbours
        model(jnp.zeros((1, 32), jnp.int32), neighbours=jnp.zeros((1, 4, 3, 16), jnp.int32))


def test_retro_config_round_trips_through_json_and_overrides():
    cfg = small(continuation=False)
    import json
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model, _ = parse_overrides(["model.retro.cca_layers=[1,3]", "model.retro.n_neighbours=4"],
                               cfg, TrainConfig())
    assert model.retro == dataclasses.replace(cfg.retro, cca_layers=(1, 3), n_neighbours=4)
    assert parse_overrides(["model.retro=null"], cfg, TrainConfig())[0].retro is None
