"""Mixtures of corpora (one model, many domains), domain-aware routing and routing analysis."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from palmlite import routing
from palmlite.accounting import count_params
from palmlite.config import BALANCE_SCOPES, ROUTINGS, ModelConfig, MoEConfig
from palmlite.corpora import Mixture, load_corpus
from palmlite.data import TokenDataset
from palmlite.evaluate import evaluate, evaluate_domains
from palmlite.mixture import GOLDEN, MixtureDataset, domain_windows, mixed_windows
from palmlite.model import Transformer
from palmlite.moe import route
from palmlite.tokenizer import ByteTokenizer
from palmlite.train import train
from palmlite.train_config import TrainConfig, parse_mixture

MIX = "mix:pydocs=0.6,(arithmetic:n=3000,lines=8)=0.4"
TINY = dict(vocab_size=259, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64,
            max_seq_len=32)


@pytest.fixture(scope="module")
def mixture():
    return load_corpus(MIX)


@pytest.fixture(scope="module")
def val(mixture):
    return MixtureDataset(mixture, ByteTokenizer(), split="validation")


def moe_model(routing_="token", n_domains=None, E=4, K=1, seed=0, **moe):
    cfg = ModelConfig(**TINY, moe=MoEConfig(n_experts=E, top_k=K, every=1, routing=routing_,
                                            n_domains=n_domains, capacity_factor=None, **moe))
    return Transformer(cfg, rngs=nnx.Rngs(seed))


# ---- the mixture spec ------------------------------------------------------------------
def test_weights_are_normalised_and_components_may_carry_their_own_options(mixture):
    assert parse_mixture("mix:a=2,b=1,c=1") == [("a", 0.5), ("b", 0.25), ("c", 0.25)]
    assert isinstance(mixture, Mixture) and sum(mixture.weights) == pytest.approx(1.0)
    assert mixture.domains == ("pydocs", "arithmetic:n=3000,lines=8")
    assert len(mixture.documents) == sum(len(c.documents) for c in mixture.components)


@pytest.mark.parametrize("spec, why", [
    ("mix:pydocs", "no numeric weight"), ("mix:pydocs=0,arithmetic=1", "finite weight > 0"),
    ("mix:pydocs=1,pydocs=2", "named twice"), ("mix:pydocs=inf", "finite weight"),
    ("mix:(mix:pydocs=1)=1", "cannot contain a mixture")])
def test_a_bad_mixture_is_refused_by_the_config_naming_the_field(spec, why):
    with pytest.raises(ValueError, match=r"TrainConfig.corpus=.*" + why + r".*mix:NAME=WEIGHT"):
        TrainConfig(corpus=spec)


def test_the_fingerprint_covers_the_weights_and_the_components(mixture):
    assert load_corpus(MIX).fingerprint == mixture.fingerprint
    assert load_corpus(MIX.replace("0.6", "0.5")).fingerprint != mixture.fingerprint
    assert load_corpus("mix:pydocs=1,arithmetic=1").fingerprint != \
        load_corpus("mix:pydocs=1,(arithmetic:n=500)=1").fingerprint


# ---- batches -----------------------------------------------------------------------------
def test_batches_are_a_pure_function_of_seed_and_step_and_hosts_read_their_rows(mixture):
    ds = MixtureDataset(mixture, ByteTokenizer())
    a, b = ds.batches(8, 32, seed=3), ds.batches(8, 32, seed=3)
    for step in (0, 5, 2):  # out of order too: a resume
        full = a.get(step)
        assert all(np.array_equal(full[k], b.get(step)[k]) for k in full)
        half = b.get(step, slice(4, 8))
        assert np.array_equal(half["tokens"], full["tokens"][4:])
        assert np.array_equal(half["domains"], full["domains"][4:])
    assert not np.array_equal(ds.batches(8, 32, seed=4).get(0)["tokens"], a.get(0)["tokens"])


def test_each_batch_holds_each_domains_share_and_its_rows_come_from_that_domain(mixture):
    ds = MixtureDataset(mixture, ByteTokenizer())
    batches = ds.batches(10, 32, seed=0)
    windows = [{d.tokens[k * 32:k * 32 + 33].astype(np.int32).tobytes()
                for k in range((len(d) - 1) // 32)} for d in ds.domains]
    seen = [set(), set()]
    for step in range(40):
        batch = batches.get(step)
        counts = np.bincount(batch["domains"], minlength=2)
        assert abs(counts[0] - 6) <= 2 and abs(counts[1] - 4) <= 2  # stratified, not sampled
        for row, d in zip(batch["tokens"], batch["domains"]):
            assert row.tobytes() in windows[d], "not a window of its domain"
            seen[d].add(row.tobytes())
    total = np.bincount(batches.domains_of(np.arange(10_000)), minlength=2) / 10_000
    np.testing.assert_allclose(total, mixture.weights, atol=2e-3)
    assert sum(map(len, seen)) == 400  # no window served twice within an epoch


def test_the_weyl_sequence_is_what_assigns_the_domains(mixture):
    batches = MixtureDataset(mixture, ByteTokenizer()).batches(4, 32, seed=0)
    g = np.arange(100)
    u = np.mod(batches.offset + g * GOLDEN, 1.0)
    np.testing.assert_array_equal(batches.domains_of(g), (u >= mixture.weights[0]).astype(int))


# ---- per-domain evaluation ------------------------------------------------------------------
def test_per_domain_losses_equal_each_domain_evaluated_alone(mixture, val):
    """A dense model's rows do not interact: the mixed batches' per-domain losses are each
    domain's own windows evaluated alone."""
    model = Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    got = evaluate_domains(model, val, 32, batch_size=4, max_batches=2)
    counts = np.bincount(mixed_windows(val, 32, 8)["domains"], minlength=2)
    assert counts.sum() == 8 and (counts > 0).all()
    for name, component, n in zip(val.names, mixture.components, counts):
        part = TokenDataset(component, ByteTokenizer(), split="validation")
        alone = evaluate(model, part, 32, batch_size=1, max_batches=int(n))
        assert got["val_loss_by_domain"][name] == pytest.approx(alone["loss"], rel=1e-5)
        assert got["val_bits_per_byte_by_domain"][name] == pytest.approx(alone["bits_per_byte"],
                                                                         rel=1e-5)
    losses = got["val_loss_by_domain"]
    assert got["val_loss"] == pytest.approx(0.6 * losses["pydocs"] +
                                            0.4 * losses["arithmetic:n=3000,lines=8"])
    bpt = [d.bytes_per_token for d in val.domains]
    assert got["val_bits_per_byte"] == pytest.approx(
        got["val_loss"] / np.log(2) / (0.6 * bpt[0] + 0.4 * bpt[1]))


def test_mixed_windows_follow_the_training_order_and_stop_before_a_domain_runs_out(val):
    w = mixed_windows(val, 32, 10)
    np.testing.assert_array_equal(w["domains"], val.batches(1, 32).domains_of(np.arange(10)))
    for d, own in enumerate(domain_windows(val, 32)):
        np.testing.assert_array_equal(w["tokens"][w["domains"] == d],
                                      own["tokens"][:(w["domains"] == d).sum()])
    every = mixed_windows(val, 32)
    used = np.bincount(every["domains"], minlength=2)
    available = [len(own["tokens"]) for own in domain_windows(val, 32)]
    assert (used <= available).all() and (used == available).any()


def test_a_domain_routed_moe_is_evaluated_under_its_training_loads():
    """Fixed map, 2 domains, 2 experts, capacity 1.5 over groups of one batch (4 x 32
    tokens): in mixed batches (2 + 2 or 3 + 1 rows) no expert overflows, so the capped
    model's per-domain losses are the dropless one's. Evaluated a domain at a time, every
    token would go to one expert and a quarter of them be dropped."""
    mix = MixtureDataset(load_corpus("mix:pydocs=0.5,(arithmetic:n=3000,lines=8)=0.5"),
                         ByteTokenizer(), split="validation")
    make = lambda cap: ModelConfig(**TINY, moe=MoEConfig(
        n_experts=2, top_k=1, every=1, routing="fixed", n_domains=2, capacity_factor=cap,
        group_size=None if cap is None else 128))
    capped = Transformer(make(1.5), rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(Transformer(make(None), rngs=nnx.Rngs(1)))
    dropless = nnx.merge(graphdef, nnx.state(capped))
    got, want = (evaluate_domains(m, mix, 32, batch_size=4, max_batches=3) for m in (capped, dropless))
    assert got["val_loss_by_domain"] == pytest.approx(want["val_loss_by_domain"], rel=1e-6)
    one_domain = dict(tokens=jnp.asarray(domain_windows(mix, 32, 4)[0]["tokens"]),
                      domains=jnp.zeros(4, jnp.int32))
    dropped = [float(s.dropped_fraction) for s in
               capped.forward(one_domain["tokens"][:, :-1], domains=one_domain["domains"])[2]]
    assert dropped == pytest.approx([0.25, 0.25])


# ---- routing toggles ---------------------------------------------------------------------
def test_batch_and_sequence_balance_losses_agree_on_one_sequence_and_differ_otherwise():
    logits = jax.random.normal(jax.random.key(0), (2 * 16, 4)) * 3
    one = logits[:16]
    assert float(route(one, 1, n_groups=1).aux_loss) == pytest.approx(
        float(route(one, 1, n_groups=1 * 1).aux_loss))
    # per sequence: the mean of each sequence's own Switch loss
    per_seq = np.mean([float(route(logits[i * 16:(i + 1) * 16], 1).aux_loss) for i in range(2)])
    assert float(route(logits, 1, n_groups=2).aux_loss) == pytest.approx(per_seq, rel=1e-6)
    # two sequences that each use one expert: balanced over the batch, not within each
    skew = jnp.concatenate([jnp.tile(jnp.array([[9.0, 0, 0, 0]]), (16, 1)),
                            jnp.tile(jnp.array([[0, 9.0, 0, 0]]), (16, 1))])
    assert float(route(skew, 1, n_groups=2).aux_loss) > float(route(skew, 1, n_groups=1).aux_loss)


def test_the_balance_scope_of_a_model_with_one_sequence_does_not_matter():
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 259)
    stats = [moe_model(balance_scope=s).forward(tokens)[2] for s in BALANCE_SCOPES]
    assert [float(s.aux_loss) for s in stats[0]] == pytest.approx(
        [float(s.aux_loss) for s in stats[1]], rel=1e-6)


def test_fixed_routing_sends_each_domain_where_the_map_says():
    model = moe_model("fixed", n_domains=3, E=8, K=2)
    tokens = jax.random.randint(jax.random.key(2), (3, 16), 0, 259)
    _, _, stats = model.forward(tokens, domains=jnp.array([2, 0, 1]))
    for s in stats:
        experts = np.asarray(s.experts_BxTxK)
        for row, d in enumerate([2, 0, 1]):
            assert (experts[row] == np.array([2 * d, 2 * d + 1])).all()


def test_task_routing_depends_on_the_domain_alone():
    model = moe_model("task", n_domains=2, E=4, K=2, seed=3)
    tokens = jax.random.randint(jax.random.key(4), (4, 16), 0, 259)
    _, _, stats = model.forward(tokens, domains=jnp.array([0, 1, 0, 1]))
    for s in stats:
        experts = np.asarray(s.experts_BxTxK)
        for d in (0, 1):
            rows = experts[d::2].reshape(-1, 2)
            assert (rows == rows[0]).all()  # every token of the domain, whatever the token
    with pytest.raises(ValueError, match="routing='task' routes by domain"):
        model(tokens)


@pytest.mark.parametrize("routing_", ROUTINGS)
def test_the_parameter_count_of_every_routing_is_the_built_models(routing_):
    model = moe_model(routing_, n_domains=None if routing_ == "token" else 2)
    built = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count_params(model.cfg) == built


@pytest.mark.parametrize("make, match", [
    (lambda: MoEConfig(routing="domain"), r"MoEConfig.routing='domain' is invalid: expected one "
                                          r"of \('token', 'task', 'fixed'\)"),
    (lambda: MoEConfig(balance_scope="group"), r"MoEConfig.balance_scope='group'.*\('batch', "),
    (lambda: MoEConfig(routing="task"), r"MoEConfig.n_domains=None is invalid: expected the "
                                        r"number of domains"),
    (lambda: MoEConfig(routing="fixed", n_domains=5, n_experts=8, top_k=2),
     r"n_domains=5 is invalid: expected at most n_experts / top_k = 4")])
def test_routing_toggles_are_validated_naming_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_domain_router_needs_a_mixture_of_its_size():
    cfg = ModelConfig(**TINY, moe=MoEConfig(routing="task", n_domains=3))
    with pytest.raises(ValueError, match=r"n_domains=3 .* expected its number of domains, 2"):
        TrainConfig(corpus=MIX).check_domains(cfg)
    with pytest.raises(ValueError, match=r"expected a 'mix:' corpus"):
        TrainConfig(corpus="pydocs").check_domains(cfg)


# ---- routing analysis ----------------------------------------------------------------------
def test_knocking_out_an_unused_expert_changes_nothing_and_a_used_one_only_its_domain(val):
    model = moe_model("fixed", n_domains=2, E=4, K=1, seed=5)
    tokens = jax.random.randint(jax.random.key(6), (2, 16), 0, 259)
    domains = jnp.array([0, 1])
    base = model(tokens, domains=domains)
    unused = routing.knock_out(model, 0, 3)  # fixed map: domains 0, 1 use experts 0, 1
    assert np.array_equal(unused(tokens, domains=domains), base)
    used = routing.knock_out(model, 0, 1)(tokens, domains=domains)
    assert np.array_equal(used[0], base[0]) and not np.allclose(used[1], base[1])
    assert np.array_equal(model(tokens, domains=domains), base)  # the original is untouched
    ko = routing.knock_out_losses(model, val, 32, batch_size=4, max_batches=1)
    assert ko["delta"].shape == (2, 4, 2)
    assert (ko["delta"][:, 2:] == 0).all() and (ko["delta"][:, 0, 1] == 0).all()


def test_expert_use_rows_are_shares_and_a_fixed_map_is_fully_specialised(val):
    model = moe_model("fixed", n_domains=2, E=4, K=1)
    use = routing.expert_use(model, val, 32, batch_size=4, max_windows=8)
    assert use.shape == (2, 2, 4)
    np.testing.assert_allclose(use.sum(-1), 1.0)
    np.testing.assert_array_equal(use[:, 0], [[1, 0, 0, 0], [0, 1, 0, 0]])
    mi = routing.specialisation(use, val.weights)
    entropy = -sum(w * np.log2(w) for w in val.weights)
    np.testing.assert_allclose(mi, entropy)  # the expert tells the domain exactly
    flat = routing.specialisation(np.full((2, 2, 4), 0.25), val.weights)
    np.testing.assert_allclose(flat, 0.0, atol=1e-12)


def test_token_routing_counts_each_token_where_it_occurs(val):
    model = moe_model(seed=7)
    equals = ByteTokenizer().encode("=")[0]
    got = routing.token_routing(model, val, {"=": equals}, 32, batch_size=4, max_windows=8)
    windows = [d.windows(32, 8) for d in val.domains]
    assert got["counts"]["="] == [int((w[:, :-1] == equals).sum()) for w in windows]
    shares = got["shares"]["="]
    assert shares.shape == (2, 2, 4)
    for d, count in enumerate(got["counts"]["="]):
        if count:
            np.testing.assert_allclose(shares[d].sum(-1), 1.0)


# ---- training on a mixture ----------------------------------------------------------------
def test_a_task_routed_run_on_a_mixture_logs_each_domain_and_resumes_identically(tmp_path):
    cfg = ModelConfig(**TINY, moe=MoEConfig(n_experts=4, top_k=1, every=1, routing="task",
                                            n_domains=2, capacity_factor=2.0))
    tc = TrainConfig(corpus=MIX, tokenizer="bytes", steps=6, batch_size=4, seq_len=32,
                     log_every=3, eval_every=3, eval_batches=1, checkpoint_every=3, quiet=True)
    full = train(cfg, tc, out=tmp_path / "full")
    train(cfg, tc.replace(stop_after=3), out=tmp_path / "half")
    resumed = train(cfg, tc, out=tmp_path / "half", resume=True)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[-1]["val_loss_by_domain"]) == {"pydocs", "arithmetic:n=3000,lines=8"}
    assert 0 <= rows[-1]["router_entropy"] <= np.log(4) + 1e-6
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in full.metrics]
    info = json.loads((tmp_path / "full" / "config.json").read_text())
    assert [d["weight"] for d in info["data"]["train"]["domains"]] == pytest.approx([0.6, 0.4])
