import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from palmlite import (ModelConfig, MoEConfig, Transformer, count_params, dense_twin,
                      flops_per_token, moe_twin, presets)
from palmlite.generate import generate_tokens
from palmlite.mlp import MLP
from palmlite.moe import MoE, capacity, moe_stats, route
from palmlite.train import compute_loss, train
from palmlite.train_config import TrainConfig, parse_overrides

SMALL = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
             max_seq_len=16)


def moe_cfg(**moe):
    return ModelConfig(**SMALL, moe=MoEConfig(**{"n_experts": 4, "top_k": 2, "every": 1, **moe}))


def activations(seed=0, shape=(2, 12, SMALL["d_model"])):
    return jax.random.normal(jax.random.key(seed), shape)


def tokens(seed=0, shape=(2, 12)):
    return jax.random.randint(jax.random.key(seed), shape, 0, SMALL["vocab_size"])


def reference(layer: MoE, x_BxTxD, capacity_factor, group=None):
    """Token by token: each chosen expert's FFN, weighted by its gate, unless that
    expert's capacity in this group (a sequence, or ``group`` tokens of the flattened
    batch) is used up by higher-priority token-slots (all 1st choices before any 2nd)."""
    up, gate, down = (np.asarray(w) for w in (layer.up_ExDxF, layer.gate_ExDxF, layer.down_ExFxD))
    B, T, D = x_BxTxD.shape
    G = T if group is None else group
    y = np.zeros((B * T, D), np.float32)
    for g, x_GxD in enumerate(np.asarray(x_BxTxD).reshape(-1, G, D)):
        r = route(jnp.asarray(x_GxD) @ layer.router_DxE[...], layer.top_k)
        gates, experts = np.asarray(r.gates_NxK), np.asarray(r.experts_NxK)
        K, E = experts.shape[1], up.shape[0]
        C = G * K if capacity_factor is None else capacity(G, K, E, capacity_factor)
        used = np.zeros(E, int)
        for k in range(K):
            for t in range(G):
                e = experts[t, k]
                if used[e] < C:
                    used[e] += 1
                    h = np.asarray(layer.act(x_GxD[t] @ gate[e])) * (x_GxD[t] @ up[e])
                    y[g * G + t] += gates[t, k] * (h @ down[e])
    return y.reshape(B, T, D)


@pytest.mark.parametrize("capacity_factor", [None, 4.0, 1.0, 0.5])
def test_both_dispatches_match_the_per_token_reference(capacity_factor):
    layer = MoE(moe_cfg(capacity_factor=capacity_factor), rngs=nnx.Rngs(0))
    x = activations()
    y, stats = nnx.jit(lambda m: m(x))(layer)
    np.testing.assert_allclose(y, reference(layer, x, capacity_factor), atol=1e-5)
    # 4.0 gives C >= T: no expert can overflow. 1.0 and 0.5 drop (an unbalanced router).
    assert (float(stats.dropped_fraction) > 0) == (capacity_factor in (1.0, 0.5))


@pytest.mark.parametrize("capacity_factor", [4.0, 1.0, 0.5])
@pytest.mark.parametrize("group_size", [12, 24, 48, 6])
def test_grouped_dispatch_matches_the_reference_over_its_groups(capacity_factor, group_size):
    """group_size = T is GShard's per-sequence einsum exactly; 24 shares capacity over both
    sequences; 48 (more than the call's 24 tokens) is one group; 6 splits each sequence."""
    layer = MoE(moe_cfg(capacity_factor=capacity_factor, group_size=group_size),
                rngs=nnx.Rngs(0))
    x = activations()
    y, stats = nnx.jit(lambda m: m(x))(layer)
    np.testing.assert_allclose(y, reference(layer, x, capacity_factor, min(group_size, 24)),
                               atol=1e-5)
    if group_size == 12:
        einsum = MoE(moe_cfg(capacity_factor=capacity_factor), rngs=nnx.Rngs(0))
        y_einsum, stats_einsum = einsum(x)
        np.testing.assert_allclose(y, y_einsum, atol=1e-6)
        assert float(stats.dropped_fraction) == pytest.approx(float(stats_einsum.dropped_fraction))


def test_larger_groups_drop_fewer_token_slots():
    """The same router over 8 sequences: capacity per sequence drops more token-slots than
    the same capacity factor over the whole batch (the load evens out over more tokens)."""
    x = activations(shape=(8, 12, SMALL["d_model"]))
    dropped = {}
    for group in (None, 96):
        layer = MoE(moe_cfg(capacity_factor=1.0, top_k=1, group_size=group), rngs=nnx.Rngs(0))
        dropped[group] = float(layer(x)[1].dropped_fraction)
    assert dropped[96] < dropped[None]


def test_one_expert_top_1_dropless_is_the_dense_ffn():
    cfg = moe_cfg(n_experts=1, top_k=1, capacity_factor=None)
    layer, dense = MoE(cfg, rngs=nnx.Rngs(0)), MLP(cfg, rngs=nnx.Rngs(1))
    dense.up.kernel[...] = layer.up_ExDxF[0]
    dense.gate.kernel[...] = layer.gate_ExDxF[0]
    dense.down.kernel[...] = layer.down_ExFxD[0]
    x = activations()
    np.testing.assert_allclose(layer(x)[0], dense(x), atol=1e-5)


def test_a_uniform_router_gives_exactly_the_load_balancing_coefficient():
    """Switch §2.2: α·E·Σ f_i P_i = α when every P_i = 1/E, whatever the f_i."""
    cfg = moe_cfg(n_experts=8, top_k=2)
    r = route(jnp.zeros((24, 8)), 2)
    assert cfg.moe.aux_loss_coef * float(r.aux_loss) == pytest.approx(cfg.moe.aux_loss_coef)
    assert float(r.router_z_loss) == pytest.approx(np.log(8) ** 2)
    np.testing.assert_allclose(r.gates_NxK, 0.5)  # GLaM: renormalised over the chosen two


def test_a_large_capacity_factor_drops_nothing_and_load_sums_to_one():
    model = Transformer(moe_cfg(capacity_factor=8.0), rngs=nnx.Rngs(0))
    _, _, per_layer = nnx.jit(lambda m: m.forward(tokens()))(model)
    stats = moe_stats(per_layer)
    assert len(per_layer) == 2
    assert float(stats["dropped_fraction"]) == 0.0
    assert stats["expert_load"].shape == (4,) and float(stats["expert_load"].sum()) == pytest.approx(1.0)


def instantiated_size(cfg):
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("changes", [dict(), dict(activation="gelu", use_bias=True),
                                     dict(block="serial", norm="layernorm"),
                                     dict(n_layers=3, moe=dict(every=2, shared_expert=True))])
def test_count_params_total_is_the_model_and_active_is_the_hand_count(changes):
    moe = MoEConfig(**{"n_experts": 4, "top_k": 2, "every": 1, **changes.pop("moe", {})})
    cfg = ModelConfig(**{**SMALL, **changes}, moe=moe)
    assert count_params(cfg) == instantiated_size(cfg)
    D, F, E, K = cfg.d_model, cfg.d_ff, moe.n_experts, moe.top_k
    expert = (3 if cfg.gated else 2) * D * F
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    unused = n_moe * (E - K) * expert  # the experts a token does not visit
    assert count_params(cfg, active=True) == count_params(cfg) - unused
    dense = count_params(cfg.replace(moe=None))  # the same model with every FFN dense
    mlp = expert + ((2 if cfg.gated else 1) * F + D if cfg.use_bias else 0)
    shared = mlp if moe.shared_expert else 0
    assert count_params(cfg, active=True) == dense + n_moe * (D * E + K * expert + shared - mlp)
    T = 8
    assert flops_per_token(cfg, T) == 6 * count_params(cfg, active=True) + \
        12 * cfg.n_layers * cfg.n_heads * cfg.head_size * T


def test_glam_layers_are_every_other_starting_with_the_second():
    cfg = presets.get("glam-0.1b-64e")
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert count_params(cfg, active=True) < count_params(cfg) / 5


@pytest.mark.parametrize("name", ["small-moe-8e", "glam-1.7b-64e"])
def test_dense_and_moe_twins_match_flops_per_token(name):
    cfg = presets.get(name)
    dense = dense_twin(cfg)
    assert dense.moe is None and dense.d_ff == round(1.5 * cfg.d_ff)  # top-2, every other layer
    assert flops_per_token(dense) == pytest.approx(flops_per_token(cfg), rel=0.01)
    assert moe_twin(dense, cfg.moe.n_experts, 2, 2) == cfg


def test_moe_config_validation_names_the_field():
    for bad, field in ((dict(top_k=3, n_experts=2), "top_k"), (dict(n_experts=0), "n_experts"),
                       (dict(every=0), "every"), (dict(capacity_factor=0.0), "capacity_factor"),
                       (dict(aux_loss_coef=-1.0), "aux_loss_coef"), (dict(top_k=1.5), "top_k"),
                       (dict(router_init_scale=0), "router_init_scale"),
                       (dict(group_size=0), "group_size"),
                       (dict(group_size=8, capacity_factor=None), "group_size")):
        with pytest.raises(ValueError, match=f"MoEConfig.{field}"):
            MoEConfig(**bad)
    with pytest.raises(ValueError, match="ModelConfig.moe"):
        ModelConfig(**SMALL).replace(moe=MoEConfig(every=3))  # n_layers=2: no MoE layer
    with pytest.raises(ValueError, match="ModelConfig.moe"):
        ModelConfig(**SMALL).replace(moe={"n_experts": 4})


def test_config_with_moe_round_trips_through_json():
    cfg = moe_cfg(capacity_factor=None, shared_expert=True)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("capacity_factor,group_size", [(None, None), (1.0, None), (1.0, 22)])
def test_gradients_reach_the_router_and_every_expert(capacity_factor, group_size):
    model = Transformer(moe_cfg(capacity_factor=capacity_factor, group_size=group_size),
                        rngs=nnx.Rngs(0))
    x = tokens(shape=(4, 12))

    def loss_fn(m):
        return compute_loss(m, x, 1e-4)[0]

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    for i in range(SMALL["n_layers"]):
        mlp = grads.blocks[i].mlp
        for g in (mlp.router_DxE, mlp.up_ExDxF, mlp.down_ExFxD):
            assert bool(jnp.all(jnp.isfinite(g[...])))
            assert float(jnp.abs(g[...]).sum()) > 0
        # Every expert received tokens (4 experts, 96 token-slots), so every expert learns.
        assert bool(jnp.all(jnp.abs(mlp.up_ExDxF[...]).sum((1, 2)) > 0))


def test_only_the_aux_losses_train_the_router_at_a_uniform_start():
    """With top-1 a single expert's gate is p_i (Switch §2.1): a zero router still learns."""
    cfg = moe_cfg(n_experts=4, top_k=1, capacity_factor=None)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    for block in model.blocks:
        block.mlp.router_DxE[...] = jnp.zeros_like(block.mlp.router_DxE[...])
    grads = nnx.jit(nnx.grad(lambda m: compute_loss(m, tokens(), 0.0)[0]))(model)
    assert float(jnp.abs(grads.blocks[0].mlp.router_DxE[...]).sum()) > 0


def test_forward_is_deterministic_and_causal_when_dropless():
    cfg = moe_cfg(capacity_factor=None)
    model, forward = Transformer(cfg, rngs=nnx.Rngs(0)), nnx.jit(lambda m, x: m(x))
    x = tokens()
    base = forward(model, x)
    np.testing.assert_array_equal(base, forward(Transformer(cfg, rngs=nnx.Rngs(0)), x))
    for t in (0, 5, 11):
        changed = x.at[:, t].set((x[:, t] + 1) % SMALL["vocab_size"])
        out = forward(model, changed)
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t], base[:, t])


def test_cached_generation_matches_recomputation():
    model = Transformer(moe_cfg(capacity_factor=None, every=2), rngs=nnx.Rngs(0))
    prompt = tokens(shape=(2, 5))
    cached = generate_tokens(model, prompt, max_new_tokens=6, temperature=0.0, return_logits=True)
    full = generate_tokens(model, prompt, max_new_tokens=6, temperature=0.0, return_logits=True,
                           use_cache=False)
    np.testing.assert_array_equal(cached.tokens_BxN, full.tokens_BxN)
    np.testing.assert_allclose(cached.logits_BxNxV, full.logits_BxNxV, atol=1e-4)


def test_training_an_moe_logs_expert_load(tmp_path, monkeypatch):
    monkeypatch.setenv("PALMLITE_CACHE", str(tmp_path / "cache"))
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text("the cat sat on the mat. " * (20 + i))
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=32, max_seq_len=32,
                      moe=MoEConfig(n_experts=4, top_k=2, every=1))
    tc = TrainConfig(corpus=str(docs), tokenizer="bytes", steps=20, batch_size=4, seq_len=32,
                     log_every=10, eval_every=20, eval_batches=1, checkpoint_every=20, quiet=True,
                     val_fraction=0.2)
    result = train(cfg, tc, out=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    for row in rows:
        assert len(row["expert_load"]) == 4 and sum(row["expert_load"]) == pytest.approx(1.0)
        per_layer = np.array(row["expert_load_per_layer"])  # both layers are MoEs
        assert per_layer.shape == (2, 4) and np.allclose(per_layer.sum(1), 1.0)
        assert np.allclose(per_layer.mean(0), row["expert_load"])
        assert row["aux_loss"] >= 1.0 - 1e-6  # E·Σ f_i P_i is minimal (1) when balanced
        assert 0 <= row["dropped_fraction"] < 1 and row["router_z_loss"] > 0
    assert np.isfinite(rows[-1]["val_loss"]) and result.model_config.moe == cfg.moe


def test_expert_weights_carry_the_expert_logical_axis():
    layer = nnx.eval_shape(lambda: MoE(moe_cfg(), rngs=nnx.Rngs(0)))
    axes = lambda p: p.get_metadata()["out_sharding"]
    assert axes(layer.up_ExDxF) == axes(layer.gate_ExDxF) == ("expert", "embed", "mlp")
    assert axes(layer.down_ExFxD) == ("expert", "mlp", "embed")
    assert axes(layer.router_DxE) == ("embed", "expert")


def test_cli_overrides_set_moe_fields():
    dense, tc = ModelConfig(**SMALL), TrainConfig()
    cfg, _ = parse_overrides(["model.moe.n_experts=4", "model.moe.capacity_factor=null"], dense, tc)
    assert cfg.moe == MoEConfig(n_experts=4, capacity_factor=None)
    assert parse_overrides(["model.moe=null"], cfg, tc)[0].moe is None
    with pytest.raises(ValueError, match="MoEConfig.top_k"):
        parse_overrides(["model.moe.top_k=8"], cfg, tc)


def test_a_group_size_that_does_not_divide_the_batch_is_refused_before_tracing():
    cfg = moe_cfg(group_size=100)
    with pytest.raises(ValueError, match="MoEConfig.group_size=100 .*batch_size=4 x seq_len=64 = 256"):
        TrainConfig(batch_size=4, seq_len=64).check_moe_groups(cfg)
    TrainConfig(batch_size=4, seq_len=64).check_moe_groups(moe_cfg(group_size=128))  # divides
    TrainConfig(batch_size=4, seq_len=64).check_moe_groups(moe_cfg(group_size=512))  # one group
