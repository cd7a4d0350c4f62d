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

import matplotlib

matplotlib.use("Agg")  # files only: works without a display, in CI and in sweeps
import matplotlib.pyplot as plt  # noqa: E402


def ablation(rows: list[dict], fig, varied: list[str]) -> None:
    """Final validation bits per byte per setting (mean over seeds, bars = min..max)."""
    ax = fig.subplots()
    groups = defaultdict(list)
    for r in rows:
        label = ", ".join(f"{k}={r['params'][k]}" for k in varied if k != "seed")
        groups[label or "baseline"].append(r["metrics"]["val_bits_per_byte"])
    labels = sorted(groups, key=lambda k: statistics.mean(groups[k]))
    means = [statistics.mean(groups[k]) for k in labels]
    errors = [[m - min(groups[k]) for k, m in zip(labels, means)],
              [max(groups[k]) - m for k, m in zip(labels, means)]]
    ax.barh(labels, means, xerr=errors, color="tab:blue", alpha=0.8, capsize=3)
    ax.set_xlim(min(means) * 0.97, max(max(v) for v in groups.values()) * 1.01)
    ax.set_xlabel("validation bits per byte (lower is better)")
    ax.set_title(f"Ablation: {len(rows)} runs, {len({r['params'].get('seed') for r in rows})} seed(s)")


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


FIGURES = {"ablation": ablation, "loss_curves": loss_curves}


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
        fig = plt.figure(figsize=(7, 4))
        FIGURES[name](rows, fig, study.varied())
        fig.text(0.01, 0.01, caption(rows), fontsize=7, color="dimgray")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        for suffix in ("png", "svg"):
            path = out_dir / f"{file}.{suffix}"
            fig.savefig(path, dpi=120)
            written.append(path)
        plt.close(fig)
    return written
