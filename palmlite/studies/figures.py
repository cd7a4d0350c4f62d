"""Figures regenerated from a study's results file (PNG and SVG, with a provenance caption).

A figure function takes the study's ``ok`` rows (parameters + the metrics each notebook
recorded), the names of the varied parameters and a matplotlib figure to draw its axes
on; ``make_figures`` adds the caption naming the device, corpus and date of the runs and
writes ``figures/<file>.{png,svg}``, where the study names the file (default
``<study>_<figure>``).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

# pyplot-free: no backend is chosen, so sweeps need no display and a notebook that imports
# palmlite.studies keeps its inline plots (matplotlib.use("Agg") here turned them off).
from matplotlib.figure import Figure

from palmlite.studies import compare
from palmlite.studies.pathways_figures import pathways, pathways_balance
from palmlite.studies.retro_figures import retro
from palmlite.studies.scaling_figures import isoflop, scaling


def ablation(rows: list[dict], fig, varied: list[str]) -> None:
    """PaLM §2 ablations: each setting's final validation loss minus the baseline's, with
    its 90% interval over seeds (paired by seed), as a dot plot around a zero line; and,
    when the runs recorded their validation history, that difference along training
    (a gap that closes is a difference in the speed of learning, one that stays is not).

    A setting is labelled by how it departs from the most common value of each varied
    parameter (the baseline), so a one-change-at-a-time ablation reads "block=serial".
    When the study also varies ``lr``, each setting is shown at its own best learning rate
    (lowest mean final loss over seeds), so no choice is judged at a rate tuned for another.
    """
    best = _best_lr_settings(rows, varied)
    if len(best) < 2:  # e.g. a partial sweep (--only): one setting, nothing to compare
        _only_one_setting(fig, rows, varied)
        return
    finals = {k: {seed: r["metrics"]["val_loss"] for seed, r in by_seed.items()}
              for k, (_, by_seed) in best.items()}
    base_label = "baseline" if "baseline" in best else min(best, key=lambda k: _mean(finals[k]))
    others = sorted((k for k in best if k != base_label), key=lambda k: _mean(finals[k]))
    with_history = all("history" in r["metrics"] for _, by_seed in best.values()
                       for r in by_seed.values())
    fig.set_size_inches(14 if with_history else 8, max(3.6, 1.8 + 0.45 * len(others)))
    ax, *ax_gap = fig.subplots(1, 2 if with_history else 1, squeeze=False)[0]
    diffs = {k: compare.difference(finals[k], finals[base_label]) for k in others}
    _difference_dots(ax, diffs, finals, base_label, [k + _lr_text(best[k][0]) for k in others])
    if ax_gap:
        _gap_along_training(ax_gap[0], best, base_label, others)
    std = compare.difference_noise(list(diffs.values()))
    lines = [f"Ablation from the baseline ({base_label}{_lr_text(best[base_label][0], ',')}: "
             f"{_mean(finals[base_label]):.3f} nats), {len(finals[base_label])} seed(s); "
             + ("seed noise unknown" if std is None else
                f"seed noise of a difference {std:.3f} nats")]
    lines += [f"{k}: {d.text()}" + (" resolved" if d.resolved else "") for k, d in diffs.items()]
    ax.set_title("\n".join(lines), fontsize=7, loc="left")


def _only_one_setting(fig, rows: list[dict], varied: list[str]) -> None:
    ax = fig.subplots()
    values = sorted({", ".join(f"{k}={r['params'][k]}" for k in varied if k not in ("seed", "lr"))
                     for r in rows})
    ax.text(0.5, 0.5, f"Only one setting has results so far ({'; '.join(values)}):\n"
            "an ablation compares at least two. Run the rest of the grid.", ha="center",
            va="center", fontsize=9, transform=ax.transAxes)
    ax.set_axis_off()


def _difference_dots(ax, diffs: dict, finals: dict, base_label: str, labels: list[str]) -> None:
    """One row per setting: the mean difference with its interval, and each seed's."""
    for y, (k, d) in enumerate(diffs.items()):
        if d.low is not None:
            ax.errorbar([d.diff], [y], xerr=[[d.diff - d.low], [d.high - d.diff]], fmt="o",
                        color="tab:red" if d.resolved and d.diff > 0 else
                        "tab:green" if d.resolved else "tab:gray", capsize=3)
        shared = sorted(set(finals[k]) & set(finals[base_label]))
        ax.plot([finals[k][s] - finals[base_label][s] for s in shared], [y] * len(shared), "k.",
                ms=3, alpha=0.5)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(f"final validation loss minus the baseline's, nats/token (right is worse)\n"
                  f"bars: {compare.LEVEL:.0%} interval over seeds; dots: single seeds", fontsize=8)


def _gap_along_training(ax, best: dict, base_label: str, others: list[str]) -> None:
    """Each setting's validation loss minus the baseline's at every evaluation (mean over
    the seeds both have): whether a final difference is one of speed or of end point."""
    base_rows = best[base_label][1]
    for i, k in enumerate(others):
        seeds = sorted(set(best[k][1]) & set(base_rows))
        curves = [_val_history(best[k][1][s]) for s in seeds]
        base = [_val_history(base_rows[s]) for s in seeds]
        tokens = sorted(set.intersection(*(set(c) for c in curves + base))) if seeds else []
        gaps = [statistics.mean(c[t] - b[t] for c, b in zip(curves, base)) for t in tokens]
        ax.plot(tokens, gaps, "o-", ms=3, color=f"C{i}", label=k)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("Δ validation loss vs baseline (nats)")
    ax.set_title("The same difference along training (mean over seeds):\n"
                 "a gap that closes is slower learning, one that stays a worse end point",
                 fontsize=8)
    ax.legend(fontsize=7)


def _val_history(row: dict) -> dict[int, float]:
    return {h["tokens"]: h["val_loss"] for h in row["metrics"]["history"] if "val_loss" in h}


def _best_lr_settings(rows: list[dict], varied: list[str]) -> dict[str, tuple[float, dict]]:
    """{setting label: (its best lr, {seed: results row at that lr})}."""
    keys = [k for k in varied if k not in ("seed", "lr")]
    common = {k: statistics.mode(str(r["params"][k]) for r in rows) for k in keys}
    runs = defaultdict(lambda: defaultdict(dict))  # label -> lr -> seed -> row
    for r in rows:
        label = ", ".join(f"{k}={r['params'][k]}" for k in keys if str(r["params"][k]) != common[k])
        lr = r["params"].get("lr", r["metrics"].get("train", {}).get("lr"))
        runs[label or "baseline"][lr][r["params"].get("seed", 0)] = r
    mean_loss = lambda by_seed: statistics.mean(r["metrics"]["val_loss"] for r in by_seed.values())
    return {label: min(by_lr.items(), key=lambda item: mean_loss(item[1]))
            for label, by_lr in runs.items()}


def _lr_text(lr, sep: str = " (") -> str:
    """" (lr 0.003)" / ", lr 0.003", or nothing when the rows do not record a rate."""
    if lr is None:
        return ""
    return f" (lr {lr:g})" if sep == " (" else f"{sep} lr {lr:g}"


def _mean(by_seed: dict) -> float:
    return statistics.mean(by_seed.values())


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
    x0, ticks, ranks, dropped = 0, [], [], []
    for i, (label, runs) in enumerate(groups.items()):
        if runs[0]["model"]["moe"] is None:
            continue
        last = [[h for h in run["history"] if "expert_load" in h][-1] for run in runs]
        loads = [sorted(h["expert_load"], reverse=True) for h in last]
        dropped += [h["dropped_fraction"] for h in last if "dropped_fraction" in h]
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
    if dropped:  # over capacity: these token-slots skipped their expert's FFN
        ax.set_title(f"dropped token-slots at the end: {statistics.mean(dropped):.1%}", fontsize=8)
    ax.legend(fontsize=7)


def _moe_verdict(groups: dict[str, list[dict]]) -> str:
    """What the runs show: each MoE's final validation loss minus its dense twin's (the
    dense run of the same depth and width with the nearest FLOPs per token), with its
    seed-paired interval and the seed noise of the difference."""
    final = lambda runs: {run["seed"]: run["val_loss"] for run in runs}
    dense = {label: runs for label, runs in groups.items() if runs[0]["model"]["moe"] is None}
    lines, diffs = [], []
    for label, runs in groups.items():
        m = runs[0]["model"]
        twins = [d for d in dense.values() if (d[0]["model"]["n_layers"], d[0]["model"]["d_model"])
                 == (m["n_layers"], m["d_model"])]
        if m["moe"] is None or not twins:
            continue
        twin = min(twins, key=lambda d: abs(d[0]["flops_per_token"] - runs[0]["flops_per_token"]))
        d = compare.difference(final(runs), final(twin))
        diffs.append(d)
        verdict = ("" if d.low is None else ": no clear difference (the interval includes 0)"
                   if not d.resolved else
                   ": MoE better, as GLaM found" if d.diff < 0 else ": MoE worse, unlike GLaM")
        lines.append(f"{label}: {d.text()} vs its dense twin{verdict}")
    std = compare.difference_noise(diffs)
    if lines and std is not None:
        lines.append(f"seed noise of a difference {std:.3f} nats")
    return "Final validation loss, MoE minus its FLOP-matched dense twin, in these runs:\n" + \
        ("\n".join(lines) or "no MoE with a dense twin among the runs")


def expert_sweep(rows: list[dict], fig, varied: list[str]) -> None:
    """Switch §3 / Fig. 4: final loss against the number of experts at equal active FLOPs
    (E = 1 is the dense model), and loss against tokens with the speed-up to reach the
    dense model's final loss (Switch's "time to quality" at equal FLOPs per token).

    Rows are notebook 06's (``metrics.runs``, one model each); runs are grouped by expert
    count, and the dense model is compared seed by seed with each MoE.
    """
    by_e = defaultdict(list)
    for run in (run for r in rows for run in r["metrics"]["runs"]):
        by_e[_n_experts(run)].append(run)
    fig.set_size_inches(12, 4.8)
    ax_e, ax_t = fig.subplots(1, 2)
    finals = {e: {run["seed"]: run["val_loss"] for run in runs} for e, runs in sorted(by_e.items())}
    for e, by_seed in finals.items():
        ax_e.plot([e] * len(by_seed), list(by_seed.values()), "k.", ms=4, alpha=0.5)
    means = [_mean(v) for v in finals.values()]
    ax_e.plot(list(finals), means, "o-", color="tab:blue", label="mean over seeds")
    for e, mean in zip(finals, means):  # capacity overflow: fewer FLOPs than the dense twin
        dropped = [h["dropped_fraction"] for run in by_e[e]
                   for h in [h for h in run["history"] if "dropped_fraction" in h][-1:]]
        if e > 1 and dropped:
            ax_e.annotate(f"{statistics.mean(dropped):.1%} dropped", (e, mean), textcoords="offset points",
                          xytext=(0, 8), ha="center", fontsize=6)
    ax_e.set_xscale("log", base=2)
    ax_e.set_xticks(list(finals), [str(e) for e in finals])
    ax_e.set_xlabel("experts E (1 = dense; equal active FLOPs per token)")
    ax_e.set_ylabel("final validation loss (nats/token)")
    dense_final = _mean(finals[1]) if 1 in finals else None
    speedups = _loss_vs_tokens(ax_t, by_e, dense_final)
    ax_e.legend(fontsize=7)
    fig.suptitle(_expert_verdict(finals, speedups), fontsize=8)


def _n_experts(run: dict) -> int:
    moe = run["model"]["moe"]
    return 1 if moe is None else moe["n_experts"]


def _loss_vs_tokens(ax, by_e: dict, dense_final: float | None) -> dict[int, float]:
    """Mean validation loss against tokens per expert count; marks where each MoE first
    reaches the dense model's final loss. Returns {E: dense tokens / MoE tokens}."""
    speedups = {}
    for i, (e, runs) in enumerate(sorted(by_e.items())):
        tokens, mean, low, high = _seed_band(runs, "val_loss")
        ax.plot(tokens, mean, color=f"C{i}", ls="--" if e == 1 else "-", marker="o", ms=2,
                label="dense" if e == 1 else f"{e} experts")
        ax.fill_between(tokens, low, high, color=f"C{i}", alpha=0.15)
        if e != 1 and dense_final is not None:
            reach = _first_crossing(tokens, mean, dense_final)
            if reach is not None:
                speedups[e] = tokens[-1] / reach
                ax.plot([reach], [dense_final], "v", color=f"C{i}", ms=8)
    if dense_final is not None:
        ax.axhline(dense_final, color="gray", ls=":", lw=0.8, label="dense final loss")
    ax.set_xlabel("tokens seen"); ax.set_ylabel("validation loss (nats/token, mean over seeds)")
    ax.legend(fontsize=7)
    return speedups


def _first_crossing(tokens: list, values: list, level: float) -> float | None:
    """The first token count (linearly interpolated) where ``values`` reaches ``level``."""
    for (t0, v0), (t1, v1) in zip(zip(tokens, values), zip(tokens[1:], values[1:])):
        if v0 > level >= v1:
            return t0 + (t1 - t0) * (v0 - level) / (v0 - v1)
    return tokens[0] if values and values[0] <= level else None


def _expert_verdict(finals: dict[int, dict], speedups: dict[int, float]) -> str:
    """The title: each MoE minus dense with its interval, the speed-up, and the resolution
    against the ~0.05 nats small-scale effect of Switch-style MoE."""
    if 1 not in finals:
        return "No dense run (E = 1) to compare with"
    lines, diffs = [], []
    for e, by_seed in finals.items():
        if e == 1:
            continue
        d = compare.difference(by_seed, finals[1])
        diffs.append(d)
        speed = f", reaches dense's final loss {speedups[e]:.2f}× sooner" if e in speedups else \
            ", never reaches dense's final loss"
        lines.append(f"E={e}: {d.text()} vs dense{speed}")
    std = compare.difference_noise(diffs)
    lines.append(compare.resolution(std, compare.SWITCH_SMALL_SCALE_EFFECT,
                                    "Switch-style MoE at small scale: ~0.05 nats"))
    return "Final validation loss, MoE minus dense at equal active FLOPs, in these runs:\n" + \
        "\n".join(lines)

FIGURES = {"ablation": ablation, "loss_curves": loss_curves, "moe_vs_dense": moe_vs_dense,
           "expert_sweep": expert_sweep,
           "scaling": scaling, "isoflop": isoflop, "retro": retro, "pathways": pathways,
           "pathways_balance": pathways_balance}


def caption(rows: list[dict]) -> str:
    devices = sorted({r["metrics"].get("device", {}).get("kind", "?") for r in rows})
    corpora = sorted({f"{c['name']} ({c['fingerprint'][:10]})" for r in rows
                      if (c := r["metrics"].get("corpus"))})
    finished = sorted(r["finished"][:10] for r in rows if r.get("finished"))
    when = "" if not finished else f" · run {finished[0]}" + (
        f" to {finished[-1]}" if finished[-1] != finished[0] else "")
    return (f"device: {', '.join(devices)} · corpus: {', '.join(corpora) or '?'} · "
            f"{len(rows)} runs{when}")


def _missing(study, figure: str, name, rows: list[dict]) -> str:
    """Which point did not record the metric or parameter a figure reads."""
    lacking = [r["point"] for r in rows
               if name not in r.get("metrics", {}) and name not in r.get("params", {})]
    where = (f"point {lacking[0]!r}" + (f" and {len(lacking) - 1} more" if len(lacking) > 1 else "")
             if lacking else "a point")
    return (f"figure {figure!r} of study {study.name!r} needs {name!r}, which {where} did not "
            f"record (the results are kept: redraw with `palmlite figures {study.path}` once "
            "the notebook records it)")


def _save_reproducibly(fig, path: Path) -> None:
    """The same results give the same bytes: no date in the file and fixed SVG ids, so
    redrawing unchanged figures leaves git clean."""
    import matplotlib
    with matplotlib.rc_context({"svg.hashsalt": "palmlite"}):
        fig.savefig(path, dpi=120, metadata={"Date": None} if path.suffix == ".svg" else None)


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
        try:
            FIGURES[name](rows, fig, study.varied())
        except KeyError as e:
            raise ValueError(_missing(study, name, e.args[0], rows)) from None
        fig.text(0.01, 0.01, caption(rows), fontsize=7, color="dimgray")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        for suffix in ("png", "svg"):
            path = out_dir / f"{file}.{suffix}"
            _save_reproducibly(fig, path)
            written.append(path)
    return written
