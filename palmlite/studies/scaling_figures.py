"""The scaling figures: Kaplan's L(N) per token budget (``scaling``) and Chinchilla's IsoFLOP
profiles (``isoflop``), drawn from a study's results rows; registered in
``palmlite.studies.figures.FIGURES`` with the others."""

from __future__ import annotations


def scaling(rows: list[dict], fig, varied: list[str]) -> None:
    """Kaplan §3, Chinchilla §3: validation loss against non-embedding parameters, with
    the law E + A/N^α fitted at each token budget, and against training compute 6ND."""
    from palmlite.scaling import fit_sweep, sweep_points  # scipy: only when drawing
    points = sweep_points(rows)
    draw_scaling(points, fit_sweep(points), fig)


def draw_scaling(points: dict, fits: dict, fig, count: str = "non_embedding") -> None:
    """Two panels from ``palmlite.scaling.sweep_points`` / ``fit_sweep`` (bars: min..max
    over seeds). Left: loss vs N, one colour per token budget D, the fitted curve and α with
    its bootstrap interval in the legend. Right: loss vs C = 6ND, each size's runs joined
    across budgets, and the compute-optimal frontier when the Chinchilla form was fitted."""
    import numpy as np
    from matplotlib import colormaps
    from palmlite.scaling import compute_optimal, over_seeds
    fig.set_size_inches(11, 4.6)
    ax_n, ax_c = fig.subplots(1, 2)
    stats = over_seeds(points)
    budgets = np.unique(stats["D"])
    for d, color in zip(budgets, colormaps["viridis"](np.linspace(0, 0.85, len(budgets)))):
        at = stats["D"] == d
        err = [stats["mean"][at] - stats["min"][at], stats["max"][at] - stats["mean"][at]]
        for ax, x in ((ax_n, stats["N"][at]), (ax_c, stats["C"][at])):
            ax.errorbar(x, stats["mean"][at], yerr=err, fmt="o", ms=4, capsize=3, color=color)
        label = f"D = {d:.3g} tokens"
        if float(d) in fits["kaplan"]:
            fit, (low, high) = fits["kaplan"][float(d)]
            N = np.geomspace(stats["N"][at].min(), stats["N"][at].max(), 100)
            label += f": α = {fit.alpha:.3f} [{low:.3f}, {high:.3f}], E = {fit.E:.2f}"
            ax_n.plot(N, fit.predict(N), color=color)
        ax_n.plot([], [], "o-", color=color, label=label)
    for n in np.unique(stats["N"]):  # one size trained on more tokens: more compute
        same = stats["N"] == n
        ax_c.plot(stats["C"][same], stats["mean"][same], color="gray", lw=0.8, alpha=0.6)
    if fits["chinchilla"] is not None:
        fit, intervals = fits["chinchilla"]
        C = np.geomspace(stats["C"].min(), stats["C"].max(), 100)
        try:
            N_opt, D_opt = compute_optimal(fit, C)
            ax_c.plot(C, fit.predict(N_opt, D_opt), "k--", label=(
                f"compute-optimal: N_opt ∝ C^{fit.beta / (fit.alpha + fit.beta):.2f} "
                f"(α = {fit.alpha:.2f}, β = {fit.beta:.2f} [{intervals['beta'][0]:.2f}, "
                f"{intervals['beta'][1]:.2f}])"))
        except ValueError as e:  # an exponent <= 0: no frontier to draw, say why
            ax_c.plot([], [], "k--", label=f"no compute-optimal frontier: {e}"[:90])
        ax_c.legend(fontsize=7)
    ax_n.set_xlabel("N: non-embedding parameters (Kaplan)" if count == "non_embedding" else
                    "N: total parameters (Chinchilla)")
    ax_c.set_xlabel(f"training compute C = 6·N·D (FLOPs, N = {count.replace('_', '-')})")
    for ax in (ax_n, ax_c):
        ax.set_xscale("log")
        ax.set_ylabel("final validation loss (nats/token)")
    ax_n.legend(fontsize=7, title="fit L = E + A/N^α per budget (90% bootstrap)", title_fontsize=7)
    ax_n.set_title(_scaling_verdict(stats, fits), fontsize=9)
    ax_c.set_title("Loss against compute" + (": one token budget, so C grows with N alone"
                                             if len(budgets) == 1 else ""), fontsize=9)


def _scaling_verdict(stats: dict, fits: dict) -> str:
    """The left title: does loss fall steadily with N at the largest budget fitted? Judged
    on the data (rank correlation of size and mean loss <= -0.9), not on the fit: a power
    law with a large α can "fit" a flat, noisy sweep."""
    from scipy.stats import spearmanr
    if not fits["kaplan"]:
        return "Too few sizes per token budget to fit L(N)"
    D = max(fits["kaplan"])
    fit, (low, high) = fits["kaplan"][D]
    rho = spearmanr(stats["N"][stats["D"] == D], stats["mean"][stats["D"] == D]).statistic
    if rho <= -0.9:
        return (f"Loss falls with size, as the papers find: α = {fit.alpha:.3f} "
                f"[{low:.3f}, {high:.3f}]")
    return (f"Loss does not fall steadily with size here (rank correlation {rho:+.2f}), "
            "unlike in Kaplan et al. and Chinchilla")


def isoflop(rows: list[dict], fig, varied: list[str]) -> None:
    """Chinchilla §3.2, Approach 2 (IsoFLOP profiles), N the total parameters (Pearce & Song
    2024). Rows: params ``flops_budget``, ``size_index``, ``seed``; metrics a TrainResult
    summary. Left: final validation loss against N per budget (mean over seeds, bars
    min..max), the parabola in ln N fitted to each and its minimum (a hollow star when the
    budget is flagged: ``palmlite.isoflop.ISOFLOP_FLAGS``). Right: N_opt against C, the fit
    N_opt ∝ C^a with its bootstrap band, Chinchilla's and Kaplan's exponents through the
    same centre, and Approach 3's exponent in the legend. The title says what a's interval
    shows, or what is missing for one."""
    import numpy as np
    from palmlite.isoflop import fit_isoflop, isoflop_parabolas
    from palmlite.scaling import sweep_points
    points = sweep_points(rows, count="total")
    fig.set_size_inches(12, 5)
    ax_n, ax_c = fig.subplots(1, 2)
    if "budget" not in points or not np.isfinite(points["budget"]).any():
        fig.suptitle("IsoFLOP profiles: no run has a flops_budget parameter, so there are no "
                     "budgets to compare", fontsize=9)
        return
    points = {k: v[np.isfinite(points["budget"])] for k, v in points.items()}
    budgets = isoflop_parabolas(points)
    try:
        fit, missing = fit_isoflop(points), None
    except ValueError as e:  # too few budgets locate a minimum: the title says which, and why
        fit, missing = None, str(e)
    _isoflop_profiles(ax_n, points, budgets)
    _isoflop_frontier(ax_c, budgets, fit, _approach3(points))
    fig.suptitle(_isoflop_verdict(budgets, fit, missing), fontsize=9)


def _sparse_minor_labels(axis) -> None:
    """A log axis spanning about a decade: label 2x and 5x only, so labels never overlap."""
    from matplotlib import ticker
    axis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
    axis.set_minor_formatter(ticker.LogFormatterSciNotation(labelOnlyBase=False,
                                                            minor_thresholds=(3, 3)))


def _isoflop_profiles(ax, points: dict, budgets: list[dict]) -> None:
    """Left panel: one colour per budget, runs averaged over seeds, parabola and minimum."""
    import numpy as np
    from matplotlib import colormaps
    from palmlite.isoflop import ISOFLOP_FLAGS
    for b, color in zip(budgets, colormaps["viridis"](np.linspace(0, 0.85, len(budgets)))):
        at = points["budget"] == b["C"]
        sizes = np.unique(points["N"][at])
        losses = [points["loss"][at & (points["N"] == n)] for n in sizes]
        mean = np.array([v.mean() for v in losses])
        err = [mean - [v.min() for v in losses], [v.max() for v in losses] - mean]
        flags = ", ".join(ISOFLOP_FLAGS[f] for f in b["flags"])
        ax.errorbar(sizes, mean, yerr=err, fmt="o", ms=4, capsize=3, color=color,
                    label=f"C = {b['C']:.2g}" + (f": {flags}" if flags else ""))
        if b["coef"] is not None:
            x = np.linspace(np.log(sizes[0]), np.log(sizes[-1]), 100)
            ax.plot(np.exp(x), np.polyval(b["coef"], x), color=color, lw=1)
        outside = {"vertex_below_range", "vertex_above_range"} & set(b["flags"])
        if np.isfinite(b["N_opt"]) and not outside:  # an extrapolated minimum is not drawn
            ax.plot(b["N_opt"], b["min_loss"], "*", ms=12, color=color,
                    mfc=color if b["used"] else "none")
    ax.set_xscale("log")
    _sparse_minor_labels(ax.xaxis)
    ax.set_xlabel("N: total parameters (Chinchilla; Pearce & Song 2024)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.legend(fontsize=7, title="budget C (FLOPs): parabola in ln N, ★ its minimum",
              title_fontsize=7)
    ax.set_title("IsoFLOP profiles: each budget split between N and D = C/(6N)", fontsize=9)


def _isoflop_frontier(ax, budgets: list[dict], fit: dict | None, approach3: str) -> None:
    """Right panel: N_opt per budget, the fitted power law and its band, the papers' lines."""
    import numpy as np
    from palmlite.isoflop import CHINCHILLA_A_APPROACH2, KAPLAN_A
    used = [b for b in budgets if b["used"]]
    ax.plot([b["C"] for b in used], [b["N_opt"] for b in used], "ko",
            label="N_opt: parabola minimum")
    for flag, marker, edge in (("vertex_below_range", "v", 0), ("vertex_above_range", "^", 1)):
        out = [b for b in budgets if flag in b["flags"]]
        if out:  # an extrapolated minimum: drawn as a bound at the edge of the sampled sizes
            ax.plot([b["C"] for b in out], [b["N_range"][edge] for b in out], marker,
                    color="gray", mfc="none", label=f"N_opt {'below' if edge == 0 else 'above'}"
                    " the sampled sizes (not fitted)")
    if fit is not None:
        C = np.geomspace(min(b["C"] for b in used) / 2, max(b["C"] for b in used) * 2, 50)
        lines = fit["samples"][:, :1] * np.log(C) + fit["samples"][:, 1:]
        tail = 50 * (1 - fit["level"])
        low, high = np.exp(np.percentile(lines, [tail, 100 - tail], axis=0))
        ax.fill_between(C, low, high, color="tab:blue", alpha=0.2)
        (a_low, a_high), pct = fit["a_interval"], f"{fit['level']:.0%}"
        ax.plot(C, np.exp(fit["log_k"]) * C ** fit["a"], color="tab:blue", label=(
            f"fit: a = {fit['a']:.2f} [{a_low:.2f}, {a_high:.2f}] ({pct} bootstrap, band); "
            f"D_opt ∝ C^{fit['b']:.2f}"))
        x0 = np.mean(np.log([b["C"] for b in used]))
        y0 = np.mean(np.log([b["N_opt"] for b in used]))
        for a, style, who in ((CHINCHILLA_A_APPROACH2, "--", "Chinchilla (Approach 2)"),
                              (KAPLAN_A, ":", "Kaplan et al.")):
            ax.plot(C, np.exp(y0 + a * (np.log(C) - x0)), style, color="gray",
                    label=f"{who}: a = {a:g}")
    ax.plot([], [], " ", label=approach3)
    if any(line.get_xydata().size for line in ax.lines):  # a log axis needs data
        from matplotlib.ticker import NullFormatter
        ax.set_xscale("log"); ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # budgets within a decade: no clutter
        sizes = [n for b in budgets for n in b["N_range"]]
        if sizes:  # a wide band would squash the points: show the sampled sizes' span, ×4
            ax.set_ylim(min(sizes) / 4, max(sizes) * 4)
    ax.set_xlabel("compute budget C = 6·N·D (FLOPs)"); ax.set_ylabel("N_opt (total parameters)")
    ax.legend(fontsize=7)
    ax.set_title("Compute-optimal size against budget", fontsize=9)


def _approach3(points: dict) -> str:
    """Chinchilla Approach 3 on the same runs: L(N, D) fitted (total N, D tokens trained) and
    its N_opt exponent β/(α+β) via compute_optimal; or why it could not be had."""
    import numpy as np
    from palmlite.isoflop import CHINCHILLA_A_APPROACH3
    from palmlite.scaling import compute_optimal, fit_chinchilla
    try:
        law = fit_chinchilla(points["N"], points["D"], points["loss"])
        C = np.median(points["C"]) * np.array([1.0, 10.0])  # any two budgets: a power law
        N_opt, _ = compute_optimal(law, C)
    except ValueError as e:  # too few runs, or an exponent <= 0: no optimum to speak of
        return f"Approach 3 (fit of L(N, D)): none, {e}"[:110]
    a = np.log(N_opt[1] / N_opt[0]) / np.log(10.0)
    return (f"Approach 3 (fit of L(N, D), same runs): a = {a:.2f} (α = {law.alpha:.2f}, "
            f"β = {law.beta:.2f}; Chinchilla {CHINCHILLA_A_APPROACH3:g})")


def _isoflop_verdict(budgets: list[dict], fit: dict | None, missing: str | None) -> str:
    """The title: a with its interval, how wide an interval must be to tell the papers
    apart, and which of their exponents the interval contains."""
    import textwrap
    from palmlite.isoflop import CHINCHILLA_A_APPROACH2 as chinchilla, KAPLAN_A as kaplan
    if fit is None:
        return textwrap.fill(f"IsoFLOP profiles (Chinchilla Approach 2): no exponent; {missing}",
                             150)
    (low, high), has = fit["a_interval"], lambda a: low <= a <= high
    if has(chinchilla) and has(kaplan):
        verdict = f"too wide to tell Chinchilla's {chinchilla:g} from Kaplan's {kaplan:g}"
    elif has(chinchilla) or has(kaplan):
        (yes, y), (no, n) = sorted([("Chinchilla", chinchilla), ("Kaplan", kaplan)],
                                   key=lambda p: not has(p[1]))
        verdict = f"consistent with {yes}'s {y:g}, excludes {no}'s {n:g}"
    else:
        verdict = f"excludes both Chinchilla's {chinchilla:g} and Kaplan's {kaplan:g}"
    return (f"IsoFLOP profiles (Chinchilla Approach 2), {fit['n_budgets']} of {len(budgets)} "
            f"budgets: N_opt ∝ C^a, a = {fit['a']:.2f} [{low:.2f}, {high:.2f}] "
            f"({fit['level']:.0%} bootstrap; interval width {high - low:.2f}, telling "
            f"{chinchilla:g} from {kaplan:g} needs < {kaplan - chinchilla:.2f}):\n{verdict}")
