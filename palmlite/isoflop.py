"""Chinchilla's Approach 2: IsoFLOP profiles (Hoffmann et al. 2022, §3.2).

At each fixed compute budget C, train several model sizes, each on D = C / (6N) tokens;
the loss against log N is a valley whose bottom is the compute-optimal size N_opt(C).
``isoflop_model`` picks the sizes of a grid from a ladder of shapes, ``isoflop_tokens``
their token counts, ``isoflop_grid`` the whole grid, and ``fit_isoflop`` fits a parabola
in log N per budget and N_opt ∝ C^a across budgets, with a stratified bootstrap interval
on a. ``palmlite.scaling`` has the parametric fits (Approach 3) and turns a study's rows
into the arrays these functions take (``sweep_points``).
"""

from __future__ import annotations

import functools

import numpy as np

from palmlite import presets
from palmlite.accounting import count_params
from palmlite.config import ModelConfig
from palmlite.scaling import checked_log, resamples

# Hoffmann et al. 2022 (Chinchilla) Table 3: a compute-optimal model sees ~20 tokens per
# parameter, so under C = 6·N·D the expected optimum is N_opt ≈ sqrt(C / (6 · 20)).
TOKENS_PER_PARAM = 20
# The shape ladder isoflop_model picks from; its limits live here and nowhere else.
LADDER_HEAD_SIZE = 16  # PaLM §2 keeps one head size at every scale (256); 16 at laptop scale
LADDER_D_MODEL_MAX = 2048  # widths 16, 32, ..., 2048 (up to ~7e9 parameters, 128 layers)
# d_model / n_layers: Kaplan et al. 2020 §3.1 (Fig. 5): shape matters little in a wide band
LADDER_ASPECT = (8, 64)
# At least two layers: a one-layer model cannot compose attention heads (no induction heads,
# Olsson et al. 2022) and ran 0.2-0.4 nats above the two-layer trend in our full study
# (studies/results, session 3: 23.7k parameters at 1 layer 2.09 vs 39.1k at 2 layers 1.67
# nats at C = 1e12), which bends an IsoFLOP parabola for a reason unrelated to size.
LADDER_MIN_LAYERS = 2
# N_opt ∝ C^a, as Hoffmann et al. 2022 (Chinchilla) Table 2 reports it:
CHINCHILLA_A_APPROACH1 = 0.50  # Chinchilla Table 2, Approach 1 (envelope of training curves)
CHINCHILLA_A_APPROACH2 = 0.49  # Chinchilla Table 2, Approach 2 (IsoFLOP profiles: fit_isoflop)
CHINCHILLA_A_APPROACH3 = 0.46  # Chinchilla Table 2, Approach 3 (parametric L(N, D): fit_chinchilla)
KAPLAN_A = 0.73  # Kaplan et al. 2020 §6.1 (N_opt ∝ C^0.73), the last row of Chinchilla Table 2
# A parabola whose curvature is within this many standard errors of zero locates no minimum
# (a t-test on the least-squares curvature: ours, not Chinchilla's, who had deep valleys).
CURVATURE_T_MIN = 2.0
ISOFLOP_FLAGS = {  # why a budget's N_opt is left out of the fit of N_opt ∝ C^a
    "too_few_sizes": "fewer than 3 distinct sizes",
    "not_convex": "loss is not convex in log N",
    "flat": f"curvature within {CURVATURE_T_MIN:g} standard errors of zero",
    "vertex_below_range": "minimum below the smallest size (extrapolated)",
    "vertex_above_range": "minimum above the largest size (extrapolated)",
}


def isoflop_model(flops_budget: float, size_index: int, *, n_sizes: int = 5, span: float = 6.0,
                  vocab_size: int = 259, base: ModelConfig | None = None) -> ModelConfig:
    """The model at ``size_index`` (-(n_sizes//2) .. n_sizes//2) of an IsoFLOP grid.

    Chinchilla §3.2 (Approach 2): at a fixed budget C, train several sizes, each on
    D = C / (6N) tokens (``isoflop_tokens``). N counts every parameter, embeddings included
    (Pearce & Song 2024: total N and compute at small scale). The grid is centred on the
    expected optimum sqrt(C / (6 · TOKENS_PER_PARAM)) and its targets are spaced evenly in
    log N from N_opt/span to N_opt·span (Czech et al. 2026: a grid off-centre or too narrow
    biases the exponent). See ``isoflop_grid`` for how a target becomes a shape.

    6·N·D leaves out attention's 12·L·d_model·T FLOPs per token (PaLM App. B): at these
    widths and T = 128 it adds 15-50% to 6N (most for narrow, deep shapes; Porian et al.
    2024 count it). The budget stays 6·N·D, Chinchilla's convention.
    """
    half = _check_isoflop_grid(flops_budget, n_sizes, span)
    if isinstance(size_index, bool) or not isinstance(size_index, (int, np.integer)) or \
            not -half <= size_index <= half:
        raise ValueError(f"size_index={size_index!r} is invalid: expected an integer from "
                         f"{-half} to {half} (n_sizes={n_sizes})")
    grid = isoflop_grid(flops_budget, n_sizes=n_sizes, span=span, vocab_size=vocab_size, base=base)
    return grid[int(size_index) + half]


def isoflop_grid(flops_budget: float, *, n_sizes: int = 5, span: float = 6.0,
                 vocab_size: int = 259, base: ModelConfig | None = None) -> list[ModelConfig]:
    """The n_sizes models of ``isoflop_model``, smallest first.

    The ladder: ``base`` (default: the "tiny" preset, PaLM's toggles: parallel block, RoPE,
    SwiGLU, multi-query, tied embeddings) with ``vocab_size`` (259: bytes and 3 specials),
    d_model = 16, 32, ... LADDER_D_MODEL_MAX, heads of LADDER_HEAD_SIZE, d_ff = 4·d_model
    (PaLM §2) and every n_layers >= LADDER_MIN_LAYERS with d_model / n_layers within
    LADDER_ASPECT. Each target gets the shape whose total parameters are nearest in log N;
    when two targets would share one (small budgets, where the ladder is coarse) the sizes
    are kept distinct by the increasing assignment with the least summed squared log error.
    """
    _check_isoflop_grid(flops_budget, n_sizes, span)
    base = _ladder_base(base, vocab_size)
    shapes, params = _ladder(base)
    n_opt = np.sqrt(flops_budget / (6 * TOKENS_PER_PARAM))
    targets = n_opt * span ** np.linspace(-1, 1, n_sizes)
    if targets[-1] > params[-1] * np.sqrt(span):
        raise ValueError(f"flops_budget={flops_budget:.3g} is invalid: its largest model "
                         f"(~{targets[-1]:.3g} parameters) is beyond the ladder's widest "
                         f"(d_model {LADDER_D_MODEL_MAX}, {params[-1]:.3g} parameters)")
    picks = _increasing_nearest(np.log(params), np.log(targets))
    return [_ladder_shape(base, *shapes[j]) for j in picks]


def isoflop_tokens(cfg: ModelConfig, flops_budget: float) -> int:
    """D = C / (6N), N the total parameters of ``cfg``, rounded to a whole token."""
    if not np.isfinite(flops_budget) or flops_budget <= 0:
        raise ValueError(f"flops_budget={flops_budget!r} is invalid: expected a positive number "
                         "of FLOPs")
    return round(flops_budget / (6 * count_params(cfg)))


def _check_isoflop_grid(flops_budget, n_sizes, span) -> int:
    """Validate a grid's arguments; returns n_sizes // 2."""
    if isinstance(flops_budget, bool) or not isinstance(flops_budget, (int, float, np.number)) \
            or not np.isfinite(flops_budget) or flops_budget <= 0:
        raise ValueError(f"flops_budget={flops_budget!r} is invalid: expected a positive number "
                         "of FLOPs")
    if isinstance(n_sizes, bool) or not isinstance(n_sizes, (int, np.integer)) or n_sizes < 3 \
            or n_sizes % 2 == 0:
        raise ValueError(f"n_sizes={n_sizes!r} is invalid: expected an odd integer >= 3 (a "
                         "parabola needs 3 sizes; odd centres the grid on the expected optimum)")
    if isinstance(span, bool) or not isinstance(span, (int, float, np.number)) or \
            not np.isfinite(span) or span <= 1:
        raise ValueError(f"span={span!r} is invalid: expected a number > 1 (the grid runs "
                         "from N_opt/span to N_opt·span)")
    return n_sizes // 2


def _ladder_base(base: ModelConfig | None, vocab_size: int) -> ModelConfig:
    base = presets.get("tiny") if base is None else base
    if base.moe is not None:
        raise ValueError("base is invalid: expected a dense model (an IsoFLOP grid counts "
                         "C = 6·N·D with N the parameters every token uses)")
    return base.replace(vocab_size=vocab_size)


def _ladder_shape(base: ModelConfig, d_model: int, n_layers: int) -> ModelConfig:
    n_heads = d_model // LADDER_HEAD_SIZE
    return base.replace(d_model=d_model, n_layers=n_layers, n_heads=n_heads, head_dim=None,
                        n_kv_heads=1 if base.n_kv_heads == 1 else n_heads, d_ff=4 * d_model)


@functools.lru_cache(maxsize=8)
def _ladder(base: ModelConfig) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Every (d_model, n_layers) of the ladder and its total parameters, by size."""
    low, high = LADDER_ASPECT
    shapes = [(d, n) for d in range(LADDER_HEAD_SIZE, LADDER_D_MODEL_MAX + 1, LADDER_HEAD_SIZE)
              for n in range(max(LADDER_MIN_LAYERS, -(-d // high)), d // low + 1)]
    params = np.array([count_params(_ladder_shape(base, d, n)) for d, n in shapes], float)
    order = np.argsort(params, kind="stable")
    return [shapes[i] for i in order], params[order]


def _increasing_nearest(log_params: np.ndarray, log_targets: np.ndarray) -> list[int]:
    """Indices j_0 < j_1 < ... into the sorted ladder minimising Σ (log P_j - log t_i)²:
    each target's nearest shape whenever those are already distinct (dynamic programming)."""
    n_targets, n_shapes = len(log_targets), len(log_params)
    cost = (log_params[None, :] - log_targets[:, None]) ** 2  # [targets, shapes]
    total, back = cost[0].copy(), []
    for i in range(1, n_targets):
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], total[:-1]]))
        arg_before = np.concatenate([[0], _running_argmin(total[:-1])])
        total = cost[i] + best_before
        back.append(arg_before)
    picks = [int(np.argmin(total))]
    for arg_before in reversed(back):
        picks.append(int(arg_before[picks[-1]]))
    picks = picks[::-1]
    assert len(set(picks)) == n_targets <= n_shapes
    return picks


def _running_argmin(values: np.ndarray) -> np.ndarray:
    """For each position, the index of the smallest value up to and including it."""
    best = np.minimum.accumulate(values)
    is_new = values == best
    return np.maximum.accumulate(np.where(is_new, np.arange(len(values)), 0))


def isoflop_parabolas(points: dict[str, np.ndarray]) -> list[dict]:
    """Chinchilla §3.2 (Approach 2), per nominal budget: final loss against ln N.

    ``points``: ``sweep_points``' arrays, the budget from ``budget`` when present, else C
    (which must then be the nominal budget). Runs without a finite budget are left out.
    For each budget: a least-squares parabola L = c₂·(ln N)² + c₁·ln N + c₀ over all its runs
    (every seed), N_opt = exp(vertex), D_opt = C / (6·N_opt), ``min_loss`` the parabola at
    its vertex, and ``flags`` (keys of ISOFLOP_FLAGS) saying why N_opt is not to be trusted;
    ``used`` is True when there are none. A vertex outside the sampled sizes is reported
    but flagged, never silently used: it is an extrapolation.
    """
    N, L = np.asarray(points["N"], float), np.asarray(points["loss"], float)
    C = np.asarray(points["budget"] if "budget" in points else points["C"], float)
    keep = np.isfinite(C)
    if not keep.any():
        raise ValueError("points has no run with a finite budget")
    checked_log("N", N[keep])
    checked_log("loss", L[keep])
    return [_isoflop_budget(float(c), N[C == c], L[C == c]) for c in np.unique(C[keep])]


def _isoflop_budget(C: float, N: np.ndarray, L: np.ndarray) -> dict:
    x = np.log(N)
    out = dict(C=C, n_runs=len(N), n_sizes=len(np.unique(N)), N_range=(N.min(), N.max()),
               coef=None, curvature_t=float("nan"), N_opt=float("nan"), D_opt=float("nan"),
               min_loss=float("nan"), flags=[], used=False)
    if out["n_sizes"] < 3:
        return dict(out, flags=["too_few_sizes"])
    coef, t = _parabola(x, L)
    out.update(coef=tuple(float(c) for c in coef), curvature_t=t)
    if coef[0] <= 0:
        return dict(out, flags=["not_convex"])
    vertex = -coef[1] / (2 * coef[0])
    N_opt = float(np.exp(vertex))
    depth = coef[0] * (np.ptp(x) / 2) ** 2  # how far the parabola rises across half the grid
    flags = ["flat"] if t < CURVATURE_T_MIN or depth <= 1e-9 * np.abs(L).mean() else []
    flags += ["vertex_below_range"] if vertex < x.min() else []
    flags += ["vertex_above_range"] if vertex > x.max() else []
    return dict(out, N_opt=N_opt, D_opt=C / (6 * N_opt), min_loss=float(np.polyval(coef, vertex)),
                flags=flags, used=not flags)


def _parabola(x: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares (c₂, c₁, c₀) and c₂'s t statistic (c₂ over its standard error from the
    residuals; inf with no residual noise, NaN with no degrees of freedom left)."""
    coef, cov = np.polyfit(x, L, 2, cov="unscaled")
    dof = len(x) - 3
    if dof < 1:
        return coef, float("nan")
    rss = float(np.sum((np.polyval(coef, x) - L) ** 2))
    se = np.sqrt(cov[0, 0] * rss / dof)
    if se == 0:
        return coef, float(np.sign(coef[0]) * np.inf)
    return coef, float(coef[0] / se)


def fit_isoflop(points: dict[str, np.ndarray], n_resamples: int = 200, level: float = 0.9,
                seed: int = 0) -> dict:
    """Chinchilla §3.2 (Approach 2): N_opt ∝ C^a and D_opt ∝ C^b across IsoFLOP budgets.

    ``isoflop_parabolas`` gives each budget's N_opt; the budgets without flags (at least 3,
    else ValueError saying what each budget lacks) give ln N_opt = a·ln C + log_k by least
    squares, and ln D_opt = b·ln C + const, where b = 1 − a exactly since D_opt = C/(6·N_opt).
    Intervals: a percentile bootstrap at ``level`` that resamples runs with replacement
    within each budget (stratified: every budget keeps its runs' count) and refits every
    parabola and the line (``_isoflop_bootstrap``). Chinchilla found a = 0.49
    (CHINCHILLA_A_APPROACH2), Kaplan et al. 0.73 (KAPLAN_A).

    Returns ``budgets`` (``isoflop_parabolas``), ``a``, ``b``, ``log_k``, ``a_interval``,
    ``b_interval``, ``samples`` (the bootstrap's (a, log_k) pairs), ``n_budgets`` (used) and
    ``level``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} is invalid: expected a number in (0, 1)")
    if n_resamples < 2:
        raise ValueError(f"n_resamples={n_resamples!r} is invalid: expected an integer >= 2")
    budgets = isoflop_parabolas(points)
    used = [b for b in budgets if b["used"]]
    if len(used) < 3:
        raise ValueError(_too_few_budgets(budgets))
    logC = np.log([b["C"] for b in used])
    a, log_k = np.polyfit(logC, np.log([b["N_opt"] for b in used]), 1)
    b = np.polyfit(logC, np.log([b["D_opt"] for b in used]), 1)[0]
    samples = _isoflop_bootstrap(points, [u["C"] for u in used], n_resamples, seed)
    tail = 100 * (1 - level) / 2
    a_low, a_high = (float(v) for v in np.percentile(samples[:, 0], [tail, 100 - tail]))
    return dict(budgets=budgets, a=float(a), b=float(b), log_k=float(log_k),
                a_interval=(a_low, a_high), b_interval=(1 - a_high, 1 - a_low),
                samples=samples, n_budgets=len(used), level=level)


def _too_few_budgets(budgets: list[dict]) -> str:
    """Why no exponent: each budget's flags, in words."""
    why = "; ".join(f"C={b['C']:.3g}: " + ", ".join(ISOFLOP_FLAGS[f] for f in b["flags"])
                    for b in budgets if b["flags"])
    return (f"too few budgets: fitting N_opt ∝ C^a needs at least 3 that locate a minimum, and "
            f"{sum(b['used'] for b in budgets)} of the {len(budgets)} here do"
            + (f" ({why})" if why else ""))


def _isoflop_bootstrap(points: dict, budgets: list[float], n_resamples: int,
                       seed: int) -> np.ndarray:
    """(a, log_k) for each of n_resamples stratified resamples of the runs at ``budgets``.

    A resample in which some budget has fewer than 3 distinct sizes or a parabola that is
    not convex has no vertex there; it is drawn again (up to 100 × n_resamples draws). A
    vertex outside the sampled sizes is kept: dropping it would narrow the interval."""
    N, L = np.asarray(points["N"], float), np.asarray(points["loss"], float)
    C = np.asarray(points["budget"] if "budget" in points else points["C"], float)
    groups = [np.flatnonzero(C == c) for c in budgets]

    def one(rng):
        vertices = []
        for at in groups:
            idx = rng.choice(at, len(at))
            coef = np.polyfit(np.log(N[idx]), L[idx], 2) if len(np.unique(N[idx])) >= 3 else None
            if coef is None or coef[0] <= 0:
                return None
            vertices.append(-coef[1] / (2 * coef[0]))
        return np.polyfit(np.log(budgets), vertices, 1)

    return np.array(resamples(one, n_resamples, seed, "had a convex parabola at every budget"))
