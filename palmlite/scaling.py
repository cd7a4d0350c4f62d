"""Scaling laws: how loss falls with parameters N and training tokens D.

Two forms, both fitted the way Hoffmann et al. 2022 (Chinchilla, §3.3 and App. D.2) fit
theirs:

- Kaplan et al. 2020 (§3): ``L(N) = E + A / N^α`` at a fixed token budget;
- Chinchilla (eq. 2): ``L(N, D) = E + A / N^α + B / D^β``, which also says how to split a
  compute budget ``C = 6·N·D`` between parameters and tokens (``compute_optimal``).

The fit minimises a Huber loss (δ = 1e-3) between the *log* of the prediction and the log
of the observed loss, with the prediction written as a log-sum-exp of its terms,
``log L̂ = LSE(a − α·log N, b − β·log D, e)`` with A = eᵃ, B = eᵇ, E = eᵉ: positive by
construction and well scaled. The objective has several optima (and flat regions where
one term swamps the others), so it is evaluated on Chinchilla's grid of starts, L-BFGS-B
runs from the best few of them, and the best optimum is kept. ``bootstrap`` refits
resampled points for an interval on the exponents.

Chinchilla's Approach 2 (§3.2, IsoFLOP profiles) lives in ``palmlite.isoflop``.

``sweep_points`` turns a study's results rows into the arrays these functions take,
``fit_sweep`` fits whatever a sweep supports (``summarise`` flattens that for a results
file), and ``sample_points`` draws runs from a known law (``CHINCHILLA``: Hoffmann et al.'s
own fit) to test the fits on.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber
from threadpoolctl import threadpool_limits

from palmlite.accounting import count_params, embedding_params
from palmlite.config import ModelConfig

HUBER_DELTA = 1e-3  # Chinchilla App. D.2
COUNTS = ("non_embedding", "total")
# Chinchilla App. D.2's grid of starts (4,500 for L(N, D), 150 for L(N)). Running L-BFGS-B
# from all of them takes minutes on a laptop; from the N_REFINE best, a second.
GRID = dict(e=(-1.0, -0.5, 0.0, 0.5, 1.0), a=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
            b=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0), alpha=(0.0, 0.5, 1.0, 1.5, 2.0),
            beta=(0.0, 0.5, 1.0, 1.5, 2.0))
N_REFINE = 10


@dataclasses.dataclass(frozen=True)
class ScalingFit:
    """A fitted law; ``B`` and ``beta`` are None for the Kaplan form L(N)."""

    E: float
    A: float
    alpha: float
    B: float | None
    beta: float | None
    objective: float  # the Huber loss at the optimum, in units of δ
    n_points: int

    @property
    def form(self) -> str:
        return "kaplan" if self.B is None else "chinchilla"

    def theta(self) -> np.ndarray:
        """(e, a, α[, b, β]): the point the optimiser works on."""
        head = [np.log(self.E), np.log(self.A), self.alpha]
        return np.array(head if self.B is None else head + [np.log(self.B), self.beta])

    def predict(self, N, D=None) -> np.ndarray:
        """The fitted loss at N parameters (and D tokens for the Chinchilla form)."""
        N = np.asarray(N, dtype=float)
        loss = self.E + self.A / N ** self.alpha
        if self.B is not None:
            if D is None:
                raise ValueError("D is required: this is a Chinchilla fit L(N, D)")
            loss = loss + self.B / np.asarray(D, dtype=float) ** self.beta
        return loss


# Chinchilla's parametric fit (Hoffmann et al. 2022, eq. 10; N total parameters, D tokens,
# L in nats/token on MassiveText): E = 1.69, A = 406.4, B = 410.7, α = 0.34, β = 0.28.
CHINCHILLA = ScalingFit(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28, objective=float("nan"),
                        n_points=0)


def fit_kaplan(N, L, inits=None) -> ScalingFit:
    """L(N) = E + A/N^α (Kaplan §3) from at least 4 runs of at least 3 sizes."""
    logN, logL = checked_log("N", N), checked_log("L", L)
    _check_points(logN, logL, "N")
    return _best_fit(logN, None, logL, _grid(("e", "a", "alpha")) if inits is None else inits)


def fit_chinchilla(N, D, L, inits=None) -> ScalingFit:
    """L(N, D) = E + A/N^α + B/D^β (Chinchilla eq. 2) from at least 6 runs covering at
    least 3 sizes and 3 token budgets (B and β need D to vary, as α needs N)."""
    logN, logD, logL = checked_log("N", N), checked_log("D", D), checked_log("L", L)
    _check_points(logN, logL, "N", n_params=5)
    _check_points(logD, logL, "D", n_params=5)
    inits = _grid(("e", "a", "alpha", "b", "beta")) if inits is None else inits
    return _best_fit(logN, logD, logL, inits)


def bootstrap(N, L, D=None, *, n_resamples: int = 200, level: float = 0.9,
              seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap over runs: an interval on α (and β with D) at ``level``.

    Each resample draws the runs with replacement and is refitted from the full-data
    optimum (a warm start: a grid per resample would cost n_resamples × the grid).
    Resamples with too few distinct sizes (or budgets) to fit are drawn again, up to
    100 × n_resamples draws.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} is invalid: expected a number in (0, 1)")
    if n_resamples < 2:
        raise ValueError(f"n_resamples={n_resamples!r} is invalid: expected an integer >= 2")
    N, L = np.asarray(N, dtype=float), np.asarray(L, dtype=float)
    fit = lambda idx, inits=None: (fit_kaplan(N[idx], L[idx], inits) if D is None else
                                   fit_chinchilla(N[idx], np.asarray(D, float)[idx], L[idx], inits))
    full = fit(np.arange(len(N)))

    def one(rng):
        try:
            refit = fit(rng.integers(0, len(N), len(N)), [full.theta()])
        except ValueError:  # too few distinct sizes or budgets in this resample
            return None
        return refit.alpha, refit.beta

    exponents = resamples(one, n_resamples, seed, "had enough distinct sizes (and budgets) to fit")
    tail = 100 * (1 - level) / 2
    names = ("alpha",) if D is None else ("alpha", "beta")
    return {name: tuple(float(x) for x in np.percentile([e[i] for e in exponents],
                                                        [tail, 100 - tail]))
            for i, name in enumerate(names)}


def compute_optimal(fit: ScalingFit, C) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt): the split of C = 6·N·D FLOPs that minimises the Chinchilla law.

    Chinchilla eq. 4: N_opt = G·(C/6)^(β/(α+β)), D_opt = G⁻¹·(C/6)^(α/(α+β)),
    G = (αA / βB)^(1/(α+β)). Equal exponents mean "scale N and D equally" (their a ≈ b ≈
    0.5; Kaplan's N_opt ∝ C^0.73 put most of the growth into N).
    """
    if fit.B is None:
        raise ValueError("fit must be a Chinchilla fit L(N, D) (fit_chinchilla); got a Kaplan fit")
    if fit.alpha <= 0 or fit.beta <= 0:
        raise ValueError(f"fit has alpha={fit.alpha:.3g}, beta={fit.beta:.3g}: both must be > 0 "
                         "for loss to fall with N and D, and for an optimum to exist")
    C = np.asarray(C, dtype=float)
    if np.any(C <= 0):
        raise ValueError("C must be positive FLOP counts")
    s = fit.alpha + fit.beta
    G = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1 / s)
    return G * (C / 6) ** (fit.beta / s), (C / 6) ** (fit.alpha / s) / G


def param_count(cfg: ModelConfig, count: str = "non_embedding") -> int:
    """N as Kaplan counts it (``non_embedding``, §2.1) or as Chinchilla does (``total``)."""
    if count not in COUNTS:
        raise ValueError(f"count={count!r} is invalid: expected one of {COUNTS}")
    total = count_params(cfg)
    return total - embedding_params(cfg) if count == "non_embedding" else total


def sweep_points(rows: list[dict], count: str = "non_embedding") -> dict[str, np.ndarray]:
    """Arrays over a study's successful runs: N (``count`` parameters), D (training
    tokens), C = 6·N·D, loss (final validation loss, nats/token) and seed.

    An IsoFLOP study's runs also carry their nominal compute budget: when any row's
    ``params`` has ``flops_budget``, ``budget`` holds it (NaN for rows without one). C stays
    6·N·D of the run as trained, which differs from the budget by the rounding of D."""
    rows = [r for r in rows if r.get("status", "ok") == "ok"]
    if not rows:
        raise ValueError("rows has no successful runs")
    N = [param_count(ModelConfig.from_dict(r["metrics"]["model"]), count) for r in rows]
    points = dict(N=np.array(N, float), D=np.array([r["metrics"]["tokens"] for r in rows], float),
                  loss=np.array([r["metrics"]["val_loss"] for r in rows], float),
                  seed=np.array([r["metrics"]["seed"] for r in rows]))
    budgets = [r.get("params", {}).get("flops_budget") for r in rows]
    if any(b is not None for b in budgets):
        points["budget"] = np.array([np.nan if b is None else b for b in budgets], float)
    return dict(points, C=6 * points["N"] * points["D"])


def over_seeds(points: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One entry per distinct (N, D): the mean, min and max loss over its seeds."""
    keys = sorted(set(zip(points["N"], points["D"])))
    losses = [points["loss"][(points["N"] == n) & (points["D"] == d)] for n, d in keys]
    N, D = (np.array(v) for v in zip(*keys))
    return dict(N=N, D=D, C=6 * N * D, mean=np.array([v.mean() for v in losses]),
                min=np.array([v.min() for v in losses]), max=np.array([v.max() for v in losses]),
                n_seeds=np.array([len(v) for v in losses]))


def fit_sweep(points: dict[str, np.ndarray], n_resamples: int = 200,
              level: float = 0.9) -> dict:
    """Every fit a sweep supports, with bootstrap intervals on the exponents.

    ``kaplan``: {D: (fit, (α_low, α_high))} for each token budget D run at >= 3 sizes
    (the Kaplan form holds D fixed). ``chinchilla``: (fit, {"alpha": ..., "beta": ...}) when
    the sweep also varies D over >= 3 budgets, else None.
    """
    N, D, L = points["N"], points["D"], points["loss"]
    kaplan = {}
    for d in np.unique(D):
        at_d = D == d
        if at_d.sum() >= 4 and len(np.unique(N[at_d])) >= 3:
            kaplan[float(d)] = (fit_kaplan(N[at_d], L[at_d]),
                                bootstrap(N[at_d], L[at_d], n_resamples=n_resamples,
                                          level=level)["alpha"])
    chinchilla = None
    if len(np.unique(D)) >= 3 and len(np.unique(N)) >= 3 and len(L) >= 6:
        chinchilla = (fit_chinchilla(N, D, L),
                      bootstrap(N, L, D, n_resamples=n_resamples, level=level))
    return dict(kaplan=kaplan, chinchilla=chinchilla)


def summarise(fits: dict) -> dict:
    """``fit_sweep``'s result as plain numbers for a results file: the Kaplan fit at the
    largest token budget (the best-trained runs) and the Chinchilla fit, or None."""
    kaplan = chinchilla = None
    if fits["kaplan"]:
        D = max(fits["kaplan"])
        fit, interval = fits["kaplan"][D]
        kaplan = dict(D=D, E=fit.E, A=fit.A, alpha=fit.alpha, alpha_interval=list(interval))
    if fits["chinchilla"] is not None:
        fit, intervals = fits["chinchilla"]
        chinchilla = dict(E=fit.E, A=fit.A, alpha=fit.alpha, B=fit.B, beta=fit.beta,
                          alpha_interval=list(intervals["alpha"]),
                          beta_interval=list(intervals["beta"]))
    return dict(kaplan=kaplan, chinchilla=chinchilla)


def sample_points(law: ScalingFit, N, D, *, noise: float = 0.005,
                  seeds=(0,)) -> dict[str, np.ndarray]:
    """Runs drawn from a known law: every (N, D) pair for every seed, the loss multiplied
    by exp(noise · a standard normal), seeded. The arrays ``sweep_points`` returns."""
    if noise < 0:
        raise ValueError(f"noise={noise!r} is invalid: expected a number >= 0")
    N, D = (g.ravel() for g in np.meshgrid(np.asarray(N, float), np.asarray(D, float)))
    runs = [(n, d, s) for s in seeds for n, d in zip(N, D)]
    N, D, seed = (np.array(v) for v in zip(*runs))
    clean = law.predict(N, D if law.B is not None else None)
    rng = np.random.default_rng(list(seeds))
    return dict(N=N, D=D, C=6 * N * D, seed=seed,
                loss=clean * np.exp(noise * rng.standard_normal(len(N))))


def resamples(draw, n_resamples: int, seed: int, what: str) -> list:
    """``n_resamples`` values of ``draw(rng)``, drawing again where it returns None (a
    resample that cannot be fitted), up to 100 × n_resamples draws; seeded."""
    rng, values = np.random.default_rng(seed), []
    for draws in range(1, 100 * n_resamples + 1):
        if (value := draw(rng)) is not None:
            values.append(value)
        if len(values) == n_resamples:
            return values
    raise ValueError(f"too few runs to bootstrap: {len(values)} of {draws} resamples {what}")


# ---- the fit itself -------------------------------------------------------------------

def _log_predict(theta, logN, logD):
    """log L̂ as LSE of the terms, and its gradient in theta, [n_params, n_runs]."""
    terms = [np.full_like(logN, theta[0]), theta[1] - theta[2] * logN]
    if logD is not None:
        terms.append(theta[3] - theta[4] * logD)
    terms = np.stack(terms)  # [n_terms, n_points]
    top = terms.max(axis=0)
    lse = top + np.log(np.exp(terms - top).sum(axis=0))
    w = np.exp(terms - lse)  # each term's share of L̂
    grad = [w[0], w[1], -w[1] * logN]
    if logD is not None:
        grad += [w[2], -w[2] * logD]
    return lse, np.stack(grad)


def _objective(theta, logN, logD, logL):
    """Σ Huber_δ(log L̂ − log L) / δ and its gradient. Divided by δ so that L-BFGS-B's
    default tolerances fit its scale: Besiroglu et al. 2024 found that Chinchilla's own fit,
    on the undivided loss, stopped before converging."""
    pred, grad_PxR = _log_predict(theta, logN, logD)
    r = pred - logL
    slope = np.clip(r, -HUBER_DELTA, HUBER_DELTA) / HUBER_DELTA  # Huber'(r) / δ
    return huber(HUBER_DELTA, r).sum() / HUBER_DELTA, grad_PxR @ slope


@threadpool_limits.wrap(limits=1, user_api="blas")
def _best_fit(logN, logD, logL, inits) -> ScalingFit:
    """L-BFGS-B from the N_REFINE starts with the lowest objective; the best optimum.

    One BLAS thread: L-BFGS-B's vectors are a few numbers long, and on a busy 2-core
    machine OpenBLAS's idle threads made each of its steps ten times slower (measured)."""
    args = (logN, logD, logL)
    inits = sorted(inits, key=lambda t: _objective(np.asarray(t, float), *args)[0])[:N_REFINE]
    best = None
    for theta0 in inits:
        res = minimize(_objective, np.asarray(theta0, float), args=args, jac=True,
                       method="L-BFGS-B")
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
            best = res
    e, a, alpha, *rest = best.x
    b, beta = rest if rest else (None, None)
    return ScalingFit(E=float(np.exp(e)), A=float(np.exp(a)), alpha=float(alpha),
                      B=None if b is None else float(np.exp(b)),
                      beta=None if beta is None else float(beta),
                      objective=float(best.fun), n_points=len(logL))


def _grid(names) -> list[tuple[float, ...]]:
    return list(itertools.product(*(GRID[n] for n in names)))


def checked_log(name: str, values) -> np.ndarray:
    """log(values), after checking they are a 1-D array of positive finite numbers."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"{name} must be a 1-D array of positive finite numbers")
    return np.log(values)


def _check_points(log_x, logL, name: str, n_params: int = 3) -> None:
    """Enough runs to over-determine the fit, and enough distinct values of ``name``."""
    if len(log_x) != len(logL):
        raise ValueError(f"{name} and L must have the same length, got {len(log_x)} and "
                         f"{len(logL)}")
    if len(logL) < n_params + 1:
        raise ValueError(f"too few points: {len(logL)} runs for a {n_params}-parameter law; "
                         f"need at least {n_params + 1}")
    if len(np.unique(log_x)) < 3:
        raise ValueError(f"too few distinct {name}: {len(np.unique(log_x))}; need at least 3 "
                         "to fit an offset, a coefficient and an exponent")
