"""Scaling-law fits: synthetic data drawn from a known law must give that law back."""

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from palmlite import presets, scaling
from palmlite.scaling import (CHINCHILLA, bootstrap, compute_optimal, fit_chinchilla, fit_kaplan,
                              fit_sweep, over_seeds, param_count, sample_points, summarise,
                              sweep_points)

# The truth to recover: Chinchilla's own fit (Hoffmann et al. 2022, eq. 10).
E, A, ALPHA, B, BETA = 1.69, 406.4, 0.34, 410.7, 0.28
KAPLAN = scaling.ScalingFit(E=E, A=A, alpha=ALPHA, B=None, beta=None, objective=0.0, n_points=0)


def kaplan_data(noise=0.003, seeds=(0, 1)):
    """7 sizes (wide enough that E is visible) × seeds, at one token budget."""
    points = sample_points(KAPLAN, np.geomspace(1e5, 1e9, 7), [1e10], noise=noise, seeds=seeds)
    return points["N"], points["loss"]


def chinchilla_data(noise=0.003):
    points = sample_points(CHINCHILLA, np.geomspace(1e5, 1e8, 6), np.geomspace(1e7, 1e10, 5),
                           noise=noise)
    return points["N"], points["D"], points["loss"]


def test_kaplan_fit_recovers_the_law():
    fit = fit_kaplan(*kaplan_data())
    assert fit.form == "kaplan" and fit.B is None and fit.n_points == 14
    assert fit.alpha == pytest.approx(ALPHA, abs=0.02)
    assert fit.E == pytest.approx(E, rel=0.03)
    N = np.array([1e5, 1e8])
    assert fit.predict(N) == pytest.approx(E + A / N ** ALPHA, rel=0.01)


def test_noiseless_kaplan_fit_is_exact():
    N = np.geomspace(1e5, 1e9, 6)
    fit = fit_kaplan(N, E + A / N ** ALPHA)
    assert (fit.E, fit.A, fit.alpha) == pytest.approx((E, A, ALPHA), rel=1e-3)


def test_chinchilla_fit_recovers_both_exponents():
    N, D, L = chinchilla_data()
    fit = fit_chinchilla(N, D, L)
    assert fit.form == "chinchilla"
    assert (fit.alpha, fit.beta) == pytest.approx((ALPHA, BETA), abs=0.02)
    assert fit.predict(1e6, 1e9) == pytest.approx(E + A / 1e6 ** ALPHA + B / 1e9 ** BETA, rel=0.01)
    with pytest.raises(ValueError, match="D is required"):
        fit.predict(1e6)


def test_huber_loss_shrugs_off_an_outlier_that_least_squares_follows(monkeypatch):
    N, L = kaplan_data(noise=0.002)  # two seeds per size
    L[3] *= 1.3  # one seed of the middle size diverged
    robust = fit_kaplan(N, L).alpha
    monkeypatch.setattr(scaling, "HUBER_DELTA", 10.0)  # Huber with a huge δ is least squares
    squares = fit_kaplan(N, L).alpha
    assert abs(robust - ALPHA) < 0.02
    assert abs(squares - ALPHA) > 3 * abs(robust - ALPHA)


def test_bootstrap_interval_contains_the_truth_and_is_seeded():
    N, L = kaplan_data(noise=0.005)
    low, high = bootstrap(N, L, n_resamples=60)["alpha"]
    assert low < ALPHA < high and high - low < 0.1
    assert bootstrap(N, L, n_resamples=5, seed=1) == bootstrap(N, L, n_resamples=5, seed=1)


def test_bootstrap_of_the_chinchilla_form_brackets_both_fitted_exponents():
    N, D, L = chinchilla_data(noise=0.005)
    fit, intervals = fit_chinchilla(N, D, L), bootstrap(N, L, D, n_resamples=20)
    for name in ("alpha", "beta"):
        low, high = intervals[name]
        assert low < getattr(fit, name) < high and high - low < 0.1


def test_compute_optimal_spends_the_budget_at_the_minimum_of_the_law():
    fit = CHINCHILLA
    C = np.array([1e18, 5.76e23])  # 5.76e23: Chinchilla's (and Gopher's) budget
    N_opt, D_opt = compute_optimal(fit, C)
    assert 6 * N_opt * D_opt == pytest.approx(C)
    for c, n in zip(C, N_opt):  # numerically: the N that minimises L(N, C / 6N)
        best = minimize_scalar(lambda logN: fit.predict(np.exp(logN), c / (6 * np.exp(logN))),
                               bounds=(5, 35), method="bounded", options=dict(xatol=1e-8))
        assert np.exp(best.x) == pytest.approx(n, rel=1e-3)
    # eq. 4's exponents: N_opt ∝ C^(β/(α+β))
    assert np.log(N_opt[1] / N_opt[0]) / np.log(C[1] / C[0]) == pytest.approx(BETA / (ALPHA + BETA))


def test_compute_optimal_needs_the_chinchilla_form_and_falling_loss():
    kaplan = fit_kaplan(*kaplan_data())
    with pytest.raises(ValueError, match="Chinchilla fit"):
        compute_optimal(kaplan, 1e20)
    rising = scaling.ScalingFit(E=E, A=A, alpha=-0.1, B=B, beta=BETA, objective=0.0, n_points=0)
    with pytest.raises(ValueError, match="must be > 0"):
        compute_optimal(rising, 1e20)


@pytest.mark.parametrize("N, L, match", [
    ([1e4, 1e5, 1e6], [3.0, 2.5, 2.2], "too few points"),
    ([1e4, 1e4, 1e5, 1e5], [3.0, 3.0, 2.5, 2.5], "too few distinct N"),
    ([1e4, 1e5, 1e6, -1.0], [3.0, 2.5, 2.2, 2.0], "N must be"),
    ([1e4, 1e5, 1e6, 1e7], [3.0, 2.5, np.nan, 2.0], "L must be"),
    ([1e4, 1e5, 1e6, 1e7], [3.0, 2.5, 2.2], "same length"),
])
def test_kaplan_fit_rejects_bad_input(N, L, match):
    with pytest.raises(ValueError, match=match):
        fit_kaplan(N, L)


def test_chinchilla_fit_needs_three_token_budgets():
    N, D, L = chinchilla_data()
    two = D < 2e8  # budgets 1e7 and 5.6e7 only
    with pytest.raises(ValueError, match="too few distinct D"):
        fit_chinchilla(N[two], D[two], L[two])


def test_bootstrap_rejects_bad_settings():
    N, L = kaplan_data()
    with pytest.raises(ValueError, match="level"):
        bootstrap(N, L, level=95)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap(N, L, n_resamples=1)


def test_param_count_leaves_out_embeddings_and_position_tables():
    cfg = presets.get("tiny")  # vocab 8192, d_model 64, RoPE: no position table
    assert param_count(cfg, "total") - param_count(cfg) == 8192 * 64
    learned = cfg.replace(position="learned", tie_embeddings=False)
    assert param_count(learned, "total") - param_count(learned) == 2 * 8192 * 64 + 128 * 64
    assert param_count(learned) == param_count(cfg)  # the blocks are the same
    with pytest.raises(ValueError, match="count='kaplan' is invalid"):
        param_count(cfg, "kaplan")


def _row(d_model, tokens, seed, val_loss, status="ok"):
    model = presets.get("tiny", d_model=d_model, d_ff=4 * d_model).to_dict()
    return dict(status=status, metrics=dict(model=model, tokens=tokens, val_loss=val_loss,
                                            seed=seed))


def test_sweep_points_and_their_seed_statistics():
    rows = [_row(64, 1000, 0, 4.0), _row(64, 1000, 1, 4.2), _row(128, 1000, 0, 3.5),
            _row(128, 1000, 1, 9.9, status="failed")]
    points = sweep_points(rows)
    N64 = param_count(presets.get("tiny"))
    N128 = param_count(presets.get("tiny", d_model=128, d_ff=512))
    assert points["N"].tolist() == [N64, N64, N128]
    assert points["C"].tolist() == (6 * points["N"] * 1000).tolist()
    stats = over_seeds(points)
    assert stats["mean"].tolist() == pytest.approx([4.1, 3.5])
    assert (stats["min"].tolist(), stats["max"].tolist(), stats["n_seeds"].tolist()) == \
        ([4.0, 3.5], [4.2, 3.5], [2, 1])
    with pytest.raises(ValueError, match="no successful runs"):
        sweep_points(rows[3:])


def test_sample_points_follow_the_law_and_the_seeds():
    clean = sample_points(CHINCHILLA, [1e6, 1e7], [1e9, 1e10, 1e11], noise=0.0, seeds=(0, 1))
    assert len(clean["N"]) == 12 and sorted(set(clean["seed"].tolist())) == [0, 1]
    assert clean["loss"] == pytest.approx(CHINCHILLA.predict(clean["N"], clean["D"]))
    assert clean["C"] == pytest.approx(6 * clean["N"] * clean["D"])
    noisy = sample_points(CHINCHILLA, [1e6, 1e7], [1e9, 1e10, 1e11], seeds=(0, 1))
    assert not np.allclose(noisy["loss"], clean["loss"])
    with pytest.raises(ValueError, match="noise"):
        sample_points(CHINCHILLA, [1e6], [1e9], noise=-1.0)


def test_fit_sweep_fits_each_token_budget_and_the_joint_law():
    points = sample_points(CHINCHILLA, np.geomspace(1e5, 1e8, 5), [1e8, 1e9, 1e10])
    fits = fit_sweep(points, n_resamples=5)
    assert sorted(fits["kaplan"]) == [1e8, 1e9, 1e10]
    fit, (low, high) = fits["kaplan"][1e9]
    assert fit.form == "kaplan" and low <= high
    chinchilla, intervals = fits["chinchilla"]
    assert chinchilla.beta == pytest.approx(BETA, abs=0.03) and set(intervals) == {"alpha", "beta"}
    summary = summarise(fits)
    assert summary["kaplan"]["D"] == 1e10
    assert summary["kaplan"]["alpha"] == fits["kaplan"][1e10][0].alpha
    assert summary["chinchilla"]["beta"] == chinchilla.beta
    one_budget = {k: v[points["D"] == 1e9] for k, v in points.items()}
    assert summarise(fit_sweep(one_budget, n_resamples=5))["chinchilla"] is None


def _law_rows(widths, budgets, law, seeds=(0,)):
    """Study rows of tiny-preset variants whose loss follows ``law`` in (N, D)."""
    rows = []
    for d_model in widths:
        cfg = presets.get("tiny", d_model=d_model, d_ff=4 * d_model)
        for tokens in budgets:
            for seed in seeds:
                loss = float(law(param_count(cfg), tokens)) * (1 + 0.002 * seed)
                rows.append(dict(status="ok", metrics=dict(model=cfg.to_dict(), tokens=tokens,
                                                           val_loss=loss, seed=seed)))
    return rows


def test_scaling_figure_shows_the_fit_and_the_frontier():
    from matplotlib.figure import Figure
    from palmlite.studies.figures import FIGURES
    law = lambda N, D: 1.5 + 30 / N ** 0.3 + 40 / D ** 0.3
    fig = Figure()
    FIGURES["scaling"](_law_rows([16, 32, 64, 128, 256], [1e5, 1e6, 1e7], law, seeds=(0, 1)),
                       fig, ["d_model", "steps", "seed"])
    left, right = fig.axes
    assert left.get_title().startswith("Loss falls with size")
    assert sum("α =" in t.get_text() for t in left.get_legend().get_texts()) == 3
    assert any(line.get_label().startswith("compute-optimal") for line in right.get_lines())
    assert "non-embedding" in left.get_xlabel()


def test_scaling_figure_says_so_when_loss_does_not_fall_with_size():
    from matplotlib.figure import Figure
    from palmlite.studies.figures import FIGURES
    rows = _law_rows([16, 32, 64, 128, 256], [1e5], lambda N, D: 3.0 + 1e-7 * N)  # rises
    fig = Figure()
    FIGURES["scaling"](rows, fig, ["d_model", "seed"])
    left, right = fig.axes
    assert left.get_title().startswith("Loss does not fall steadily with size")
    assert "one token budget" in right.get_title()
