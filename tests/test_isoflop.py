"""Chinchilla Approach 2 (IsoFLOP profiles): the grid's models, the fit, and its figure."""

import itertools
import json

import numpy as np
import pytest

from palmlite import isoflop, presets
from palmlite.accounting import count_params
from palmlite.isoflop import fit_isoflop, isoflop_grid, isoflop_model, isoflop_parabolas, isoflop_tokens
from palmlite.scaling import CHINCHILLA, compute_optimal, sweep_points

# The truth to recover: Chinchilla's own law (eq. 10), whose N_opt ∝ C^(β/(α+β)).
A_TRUE = CHINCHILLA.beta / (CHINCHILLA.alpha + CHINCHILLA.beta)  # 0.28 / 0.62 ≈ 0.452


@pytest.mark.parametrize("C", [3e12, 1e13, 1e14, 1e15])
def test_isoflop_models_grow_with_size_index_and_hit_their_targets(C):
    cfgs = [isoflop_model(C, i) for i in range(-2, 3)]
    N = np.array([count_params(c) for c in cfgs], float)
    n_opt = np.sqrt(C / (6 * isoflop.TOKENS_PER_PARAM))
    targets = n_opt * 6.0 ** np.linspace(-1, 1, 5)
    assert np.all(np.diff(N) > 0)
    assert np.all(np.abs(np.log(N / targets)) < np.log(1.5))
    assert N[2] == pytest.approx(n_opt, rel=0.5)
    for c in cfgs:  # the ladder: PaLM's toggles, heads of 16, d_ff = 4 d_model, bytes
        assert c.d_model % 16 == 0 and c.head_size == 16 and c.d_ff == 4 * c.d_model
        low, high = isoflop.LADDER_ASPECT
        assert low <= c.d_model / c.n_layers <= high and c.n_layers >= isoflop.LADDER_MIN_LAYERS
        assert (c.vocab_size, c.block, c.position, c.activation, c.n_kv_heads,
                c.tie_embeddings) == (259, "parallel", "rope", "swiglu", 1, True)
    assert cfgs == isoflop_grid(C)


def test_isoflop_tokens_spend_the_budget():
    C = 1e13
    for i in range(-2, 3):
        cfg = isoflop_model(C, i)
        D = isoflop_tokens(cfg, C)
        assert isinstance(D, int) and abs(6 * count_params(cfg) * D - C) <= 3 * count_params(cfg)


def test_a_coarse_ladder_still_gives_distinct_sizes():
    """At 1e11 FLOPs the two smallest targets share a nearest shape; the grid keeps them apart."""
    N = [count_params(isoflop_model(1e11, i)) for i in range(-2, 3)]
    assert N == sorted(set(N))
    wide = isoflop_model(1e13, 0, vocab_size=8192, base=presets.get("small"))
    assert wide.vocab_size == 8192 and wide.norm == "rmsnorm"


def test_increasing_nearest_is_the_best_increasing_assignment():
    rng = np.random.default_rng(0)
    for _ in range(20):
        params = np.sort(rng.uniform(0, 5, 9))
        targets = np.sort(rng.uniform(0, 5, 3))
        picks = isoflop._increasing_nearest(params, targets)
        cost = lambda js: sum((params[j] - t) ** 2 for j, t in zip(js, targets))
        best = min(itertools.combinations(range(9), 3), key=cost)
        assert picks == sorted(set(picks)) and cost(picks) == pytest.approx(cost(best))


@pytest.mark.parametrize("args, kwargs, match", [
    ((0.0, 0), {}, "flops_budget=0.0 is invalid"),
    ((float("nan"), 0), {}, "flops_budget=nan is invalid"),
    ((1e40, 0), {}, "flops_budget=1e.* beyond the ladder"),
    ((1e13, 3), {}, "size_index=3 is invalid: expected an integer from -2 to 2"),
    ((1e13, 1.0), {}, "size_index=1.0 is invalid"),
    ((1e13, 0), dict(n_sizes=4), "n_sizes=4 is invalid: expected an odd integer >= 3"),
    ((1e13, 0), dict(n_sizes=1), "n_sizes=1 is invalid"),
    ((1e13, 0), dict(span=1.0), "span=1.0 is invalid"),
    ((1e13, 0), dict(base=presets.get("tiny-moe-4e")), "base is invalid: expected a dense"),
])
def test_isoflop_model_rejects_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        isoflop_model(*args, **kwargs)


def test_isoflop_tokens_rejects_a_bad_budget():
    with pytest.raises(ValueError, match="flops_budget=-1"):
        isoflop_tokens(presets.get("tiny"), -1)


def isoflop_points(law, budgets, *, seeds=(0, 1, 2), noise=0.005, span=6.0, shift=1.0):
    """Runs drawn as ``sample_points`` draws them: 5 sizes per budget centred on
    ``shift`` × the law's own optimum, D = C/(6N), loss × exp(noise · a standard normal)."""
    rng = np.random.default_rng(list(seeds))
    runs = [(C, N, s) for C in budgets
            for N in shift * compute_optimal(CHINCHILLA, C)[0] * span ** np.linspace(-1, 1, 5)
            for s in seeds]
    C, N, seed = (np.array(v, float) for v in zip(*runs))
    D = C / (6 * N)
    loss = law(N, D) * np.exp(noise * rng.standard_normal(len(N)))
    return dict(N=N, D=D, C=C, budget=C, loss=loss, seed=seed)


BUDGETS = np.geomspace(1e18, 1e21, 4)


def test_fit_isoflop_recovers_the_compute_optimal_exponent():
    points = isoflop_points(CHINCHILLA.predict, BUDGETS)
    fit = fit_isoflop(points)
    low, high = fit["a_interval"]
    assert abs(fit["a"] - A_TRUE) < 0.05 and low < A_TRUE < high
    assert fit["b"] == pytest.approx(1 - fit["a"]) and fit["b_interval"] == \
        pytest.approx((1 - high, 1 - low))
    assert fit["n_budgets"] == 4 and fit["samples"].shape == (200, 2)
    true_opt = compute_optimal(CHINCHILLA, BUDGETS)[0]
    for b, n in zip(fit["budgets"], true_opt):
        assert b["used"] and not b["flags"] and b["n_runs"] == 15 and b["n_sizes"] == 5
        assert b["N_opt"] == pytest.approx(n, rel=0.25)  # noise moves the vertex
        assert b["D_opt"] == pytest.approx(b["C"] / (6 * b["N_opt"]))
        assert b["min_loss"] == pytest.approx(CHINCHILLA.predict(n, b["C"] / (6 * n)), rel=0.01)
    again = fit_isoflop(points, n_resamples=5, seed=3)  # seeded
    assert again["a_interval"] == fit_isoflop(points, n_resamples=5, seed=3)["a_interval"]


@pytest.mark.parametrize("noise", [0.0, 0.005])
def test_losses_that_do_not_depend_on_size_are_flagged_not_fitted(noise):
    flat = isoflop_points(lambda N, D: 3.0 + 0 * N, BUDGETS, noise=noise)
    budgets = isoflop_parabolas(flat)
    # Pure noise passes the curvature t-test (t >= 2) at a budget ~3% of the time (here at
    # one of the four with noise): needing 3 budgets that locate a minimum is the guard.
    flagged = [b for b in budgets if set(b["flags"]) & {"not_convex", "flat"}]
    assert len(flagged) >= 3 and not any(b["used"] for b in flagged)
    with pytest.raises(ValueError, match="too few budgets: .* [01] of the 4 here do"):
        fit_isoflop(flat)


def test_a_grid_that_misses_the_optimum_is_flagged_not_extrapolated():
    above = isoflop_points(CHINCHILLA.predict, BUDGETS, noise=0.0, span=3.0, shift=30.0)
    budgets = isoflop_parabolas(above)
    for b in budgets:  # every size far above the optimum: the minimum is not in the grid
        assert "vertex_below_range" in b["flags"] or "not_convex" in b["flags"]
        assert not b["used"]
    with pytest.raises(ValueError, match="minimum below the smallest size"):
        fit_isoflop(above)


def test_fit_isoflop_needs_three_budgets_and_sane_settings():
    points = isoflop_points(CHINCHILLA.predict, BUDGETS)
    two = {k: v[points["budget"] < 1e19 * 5] for k, v in points.items()}
    with pytest.raises(ValueError, match="needs at least 3 that locate a minimum, and 2 of the 2"):
        fit_isoflop(two)
    with pytest.raises(ValueError, match="level"):
        fit_isoflop(points, level=90)
    with pytest.raises(ValueError, match="n_resamples"):
        fit_isoflop(points, n_resamples=1)
    two_sizes = {k: v[np.isin(points["N"], np.unique(points["N"])[:2])] for k, v in points.items()}
    (budget,) = isoflop_parabolas(two_sizes)
    assert budget["flags"] == ["too_few_sizes"] and budget["coef"] is None
    with pytest.raises(ValueError, match="fewer than 3 distinct sizes"):
        fit_isoflop(two_sizes)


def test_isoflop_uses_C_as_the_budget_when_there_is_no_budget_key():
    points = isoflop_points(CHINCHILLA.predict, BUDGETS)
    no_key = {k: v for k, v in points.items() if k != "budget"}
    assert fit_isoflop(no_key, n_resamples=5)["a"] == fit_isoflop(points, n_resamples=5)["a"]


# ---- study rows, as an IsoFLOP study's notebook records them ------------------------------

def study_rows(budgets, law=CHINCHILLA.predict, seeds=(0, 1), noise=0.005):
    """One row per (budget, size_index, seed): the grid's model trained on isoflop_tokens."""
    rng, rows = np.random.default_rng(0), []
    for C, i, seed in itertools.product(budgets, range(-2, 3), seeds):
        cfg = isoflop_model(C, i)
        D, N = isoflop_tokens(cfg, C), count_params(cfg)
        loss = float(law(N, D) * np.exp(noise * rng.standard_normal()))
        rows.append(dict(point=f"flops_budget={C:g},seed={seed},size_index={i}", status="ok",
                         params=dict(flops_budget=C, size_index=i, seed=seed),
                         metrics=dict(model=cfg.to_dict(), tokens=D, val_loss=loss, params=N,
                                      seed=seed, device={"kind": "cpu"},
                                      corpus={"name": "pystdlib", "fingerprint": "0123456789ab"})))
    return rows


def test_sweep_points_carry_the_nominal_budget():
    rows = study_rows([1e13])
    points = sweep_points(rows, "total")
    assert points["budget"].tolist() == [1e13] * 10
    assert points["C"] == pytest.approx(6 * points["N"] * points["D"])
    assert np.all(np.abs(points["C"] / 1e13 - 1) < 1e-3)  # D rounded to whole tokens
    del rows[0]["params"]["flops_budget"]
    assert np.isnan(sweep_points(rows, "total")["budget"][0])
    for r in rows:
        r.pop("params")
    assert "budget" not in sweep_points(rows)


class Study:  # what make_figures reads of a study
    figures = {"isoflop": "isoflop"}

    def varied(self):
        return ["flops_budget", "size_index", "seed"]


def test_isoflop_figure_is_drawn_from_a_results_file(tmp_path):
    from palmlite.studies.figures import make_figures
    from palmlite.studies.results import read_results
    results = tmp_path / "isoflop.jsonl"
    rows = study_rows([1e12, 3e12, 1e13, 3e13])
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = make_figures(Study(), read_results(results), tmp_path / "figures")
    assert sorted(f.name for f in files) == ["isoflop.png", "isoflop.svg"]
    assert all(f.stat().st_size > 1000 for f in files)


def draw(rows):
    from matplotlib.figure import Figure
    from palmlite.studies.figures import FIGURES
    fig = Figure()
    FIGURES["isoflop"](rows, fig, Study().varied())
    return fig


def test_isoflop_figure_title_states_the_fitted_exponent_and_verdict():
    rows = study_rows([1e12, 3e12, 1e13, 3e13])
    fit = fit_isoflop(sweep_points(rows, "total"))
    fig = draw(rows)
    title = fig.get_suptitle()
    low, high = fit["a_interval"]
    assert f"a = {fit['a']:.2f} [{low:.2f}, {high:.2f}]" in title
    assert f"interval width {high - low:.2f}" in title
    assert (f"consistent with Chinchilla's {isoflop.CHINCHILLA_A_APPROACH2:g}, excludes Kaplan's "
            f"{isoflop.KAPLAN_A:g}" if low <= isoflop.CHINCHILLA_A_APPROACH2 <= high else
            "excludes both") in title
    left, right = fig.axes
    legend = [t.get_text() for t in right.get_legend().get_texts()]
    assert any(t.startswith("fit: a = ") for t in legend)
    assert any(t.startswith("Chinchilla") for t in legend) and any(t.startswith("Kaplan") for t in legend)
    assert any(t.startswith("Approach 3") for t in legend)
    assert "total parameters" in left.get_xlabel()


def test_isoflop_figure_says_what_is_missing():
    fig = draw(study_rows([1e12, 3e12]))  # two budgets
    assert "no exponent" in fig.get_suptitle() and "at least 3" in fig.get_suptitle()
    rows = study_rows([1e13])
    for r in rows:
        del r["params"]["flops_budget"]
    assert "no run has a flops_budget" in draw(rows).get_suptitle()
