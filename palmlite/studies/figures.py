"""Figures regenerated from a study's results file (PNG and SVG, with a provenance caption).

A figure function takes the study's ``ok`` rows (parameters + the metrics each notebook
recorded), the names of the varied parameters and a matplotlib figure to draw its axes
on; ``make_figures`` adds the caption naming the device, corpus and date of the runs and
writes ``figures/<file>.{png,svg}``, where the study names the file (default
``<study>_<figure>``).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from pathlib import Path

# pyplot-free: no backend is chosen, so sweeps need no display and a notebook that imports
# palmlite.studies keeps its inline plots (matplotlib.use("Agg") here turned them off).
from matplotlib.figure import Figure


def ablation(rows: list[dict], fig, varied: list[str]) -> None:
    """Final validation bits per byte per setting (mean over seeds, bars = min..max).

    A setting is labelled by how it departs from the most common value of each varied
    parameter (the baseline), so a one-change-at-a-time ablation reads "block=serial"."""
    ax = fig.subplots()
    keys = [k for k in varied if k != "seed"]
    common = {k: statistics.mode(str(r["params"][k]) for r in rows) for k in keys}
    groups = defaultdict(list)
    for r in rows:
        label = ", ".join(f"{k}={r['params'][k]}" for k in keys if str(r["params"][k]) != common[k])
        groups[label or "baseline"].append(r["metrics"]["val_bits_per_byte"])
    labels = sorted(groups, key=lambda k: statistics.mean(groups[k]))
    means = [statistics.mean(groups[k]) for k in labels]
    errors = [[m - min(groups[k]) for k, m in zip(labels, means)],
              [max(groups[k]) - m for k, m in zip(labels, means)]]
    ax.barh(labels, means, xerr=errors, color="tab:blue", alpha=0.8, capsize=3)
    ax.set_xlim(min(means) * 0.97, max(max(v) for v in groups.values()) * 1.01)
    ax.set_xlabel("validation bits per byte (lower is better)")
    baseline = ", ".join(f"{k}={v}" for k, v in common.items())
    ax.set_title(f"Ablation: {len(rows)} runs, {len({r['params'].get('seed') for r in rows})} "
                 f"seed(s); baseline {baseline}", fontsize=8)


def loss_curves(rows: list[dict], fig, varied: list[str]) -> None:
    """Validation loss against tokens seen, one line per run."""
    ax = fig.subplots()
    for r in sorted(rows, key=lambda r: r["point"]):
        steps = r["metrics"]["history"]
        ax.plot([s["tokens"] for s in steps if "val_loss" in s],
                [s["val_loss"] for s in steps if "val_loss" in s], marker="o", ms=3,
                label=", ".join(f"{k}={r['params'][k]}" for k in varied))
    ax.set_xlabel("tokens seen"); ax.set_ylabel("validation loss (nats/token)")
    ax.legend(fontsize=7)


def moe_vs_dense(rows: list[dict], fig, varied: list[str]) -> None:
    """GLaM §5, Switch §3: each mixture of experts against its FLOP-matched dense twin.

    Each row's metrics hold ``runs``, one per model trained (notebook 06). Left, middle:
    validation loss against tokens seen and against training FLOPs (active FLOPs/token ×
    tokens: what a token costs, GLaM's measure), mean over seeds with a min..max band.
    Right: each MoE's final expert load (its last log interval, averaged over the MoE
    layers) against the uniform share 1/E; experts are sorted by load within each run,
    since expert ids mean nothing across seeds. The title says what these runs show.
    """
    groups = _arch_groups([run for r in rows for run in r["metrics"]["runs"]])
    fig.set_size_inches(13, 4.6)
    ax_tokens, ax_flops, ax_load = fig.subplots(1, 3)
    for i, (label, runs) in enumerate(groups.items()):
        tokens, mean, low, high = _seed_band(runs, "val_loss")
        flops = [t * runs[0]["flops_per_token"] for t in tokens]
        dense = runs[0]["model"]["moe"] is None
        for ax, x in ((ax_tokens, tokens), (ax_flops, flops)):
            ax.plot(x, mean, color=f"C{i}", ls="--" if dense else "-", marker="o", ms=3,
                    label=f"{label}, {len(runs)} seed(s)")
            ax.fill_between(x, low, high, color=f"C{i}", alpha=0.2)
    for ax, xlabel in ((ax_tokens, "tokens seen"), (ax_flops, "training FLOPs (active)")):
        ax.set_xlabel(xlabel); ax.set_ylabel("validation loss (nats/token)")
    ax_tokens.legend(fontsize=7)
    _expert_load_bars(ax_load, groups)
    fig.suptitle(_moe_verdict(groups), fontsize=9)


def _arch_groups(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by model (differing only by seed), dense before MoE, fewer experts first."""
    def key(run):
        m = run["model"]
        return m["n_layers"], m["d_model"], m["moe"] is not None, (m["moe"] or {}).get("n_experts", 0)
    groups = defaultdict(list)
    for run in sorted(runs, key=key):
        m = run["model"]
        size = f"{m['n_layers']}L×{m['d_model']}"
        groups[f"{size} dense, d_ff {m['d_ff']}" if m["moe"] is None else
               f"{size} MoE {m['moe']['n_experts']}E top-{m['moe']['top_k']}"].append(run)
    return dict(groups)


def _seed_band(runs: list[dict], key: str) -> tuple[list, list, list, list]:
    """(tokens, mean, min, max) of a history metric over seeds, where every run has it."""
    per_run = [{h["tokens"]: h[key] for h in run["history"] if h.get(key) is not None}
               for run in runs]
    tokens = sorted(set.intersection(*(set(p) for p in per_run)))
    values = [[p[t] for p in per_run] for t in tokens]
    return tokens, [statistics.mean(v) for v in values], [min(v) for v in values], \
        [max(v) for v in values]


def _expert_load_bars(ax, groups: dict[str, list[dict]]) -> None:
    """Bars: each MoE's final load per expert, most loaded first (mean over seeds,
    min..max); dotted: the uniform share 1/E that the balancing loss pushes towards."""
    x0, ticks, ranks = 0, [], []
    for i, (label, runs) in enumerate(groups.items()):
        if runs[0]["model"]["moe"] is None:
            continue
        loads = [sorted([h for h in run["history"] if "expert_load" in h][-1]["expert_load"],
                        reverse=True) for run in runs]
        by_rank = list(zip(*loads))  # [E][seeds]
        mean = [statistics.mean(v) for v in by_rank]
        x = list(range(x0, x0 + len(mean)))
        spread = [[m - min(v) for m, v in zip(mean, by_rank)],
                  [max(v) - m for m, v in zip(mean, by_rank)]]
        ax.bar(x, mean, yerr=spread if len(runs) > 1 else None, color=f"C{i}", capsize=2, label=label)
        ax.hlines(1 / len(mean), x[0] - 0.4, x[-1] + 0.4, colors="black", linestyles=":",
                  label="uniform 1/E" if not ticks else None)
        ticks += x
        ranks += range(1, len(x) + 1)
        x0 += len(mean) + 1
    ax.set_xticks(ticks, ranks, fontsize=6)
    ax.set_xlabel("experts, most to least loaded"); ax.set_ylabel("share of routed token-slots")
    ax.legend(fontsize=7)


def _moe_verdict(groups: dict[str, list[dict]]) -> str:
    """What the runs show: each MoE's final validation loss minus its dense twin's (the
    dense run of the same depth and width with the nearest FLOPs per token)."""
    final = lambda runs: [run["val_loss"] for run in runs]
    dense = {label: runs for label, runs in groups.items() if runs[0]["model"]["moe"] is None}
    lines = []
    for label, runs in groups.items():
        m = runs[0]["model"]
        twins = [d for d in dense.values() if (d[0]["model"]["n_layers"], d[0]["model"]["d_model"])
                 == (m["n_layers"], m["d_model"])]
        if m["moe"] is None or not twins:
            continue
        twin = min(twins, key=lambda d: abs(d[0]["flops_per_token"] - runs[0]["flops_per_token"]))
        delta = statistics.mean(final(runs)) - statistics.mean(final(twin))
        if len(runs) < 2 or len(twin) < 2:
            verdict = "one seed: noise unknown"
        elif abs(delta) <= max(max(v) - min(v) for v in (final(runs), final(twin))):
            verdict = "no clear difference (within the seed spread)"
        else:
            verdict = "MoE better, as GLaM found" if delta < 0 else "MoE worse, unlike GLaM"
        lines.append(f"{label}: {delta:+.3f} nats vs its dense twin, {verdict}")
    return "Final validation loss, MoE minus its FLOP-matched dense twin, in these runs:\n" + \
        ("\n".join(lines) or "no MoE with a dense twin among the runs")


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


FIGURES = {"ablation": ablation, "loss_curves": loss_curves, "moe_vs_dense": moe_vs_dense,
           "scaling": scaling}


def caption(rows: list[dict]) -> str:
    devices = sorted({r["metrics"].get("device", {}).get("kind", "?") for r in rows})
    corpora = sorted({f"{c['name']} ({c['fingerprint'][:10]})" for r in rows
                      if (c := r["metrics"].get("corpus"))})
    return (f"device: {', '.join(devices)} · corpus: {', '.join(corpora) or '?'} · "
            f"{len(rows)} runs · drawn {time.strftime('%Y-%m-%d')}")


def make_figures(study, rows: list[dict], out_dir: str | Path = "figures") -> list[Path]:
    """Draw every figure the study names from its successful rows; returns the files."""
    rows = [r for r in rows if r["status"] == "ok"]
    if not rows:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, file in study.figures.items():
        fig = Figure(figsize=(7, 4))
        FIGURES[name](rows, fig, study.varied())
        fig.text(0.01, 0.01, caption(rows), fontsize=7, color="dimgray")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        for suffix in ("png", "svg"):
            path = out_dir / f"{file}.{suffix}"
            fig.savefig(path, dpi=120)
            written.append(path)
    return written
