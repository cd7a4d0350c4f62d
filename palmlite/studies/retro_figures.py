"""RETRO's figure: baseline vs RETRO vs RETRO-fit, the database size, and the leakage curve.

Each results row is one seed of notebook 10: its metrics hold ``runs`` (the baseline, RETRO
from scratch and RETRO-fit, each a ``TrainResult.summary()`` with an ``arch``), ``database``
(bits per byte of each model with databases of several sizes) and ``leakage`` (RETRO §2.6:
each model's chunk loss over the chunks whose overlap with their neighbours is <= α).
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from palmlite.studies import compare

ARCHS = {"baseline": "baseline (no retrieval)", "retro": "RETRO from scratch",
         "retrofit": "RETRO-fit (frozen baseline + CCA, encoder)"}
LEAKAGE_ALPHA = 0.125  # RETRO §2.6 reports down to 12.5%: fewer than 8 of 64 tokens shared


def retro(rows: list[dict], fig, varied: list[str]) -> None:
    """Left: validation bits per byte against tokens seen (RETRO-fit after its baseline's
    tokens), mean over seeds with a min..max band; RETRO also with retrieval off (dotted).
    Middle: final bits per byte against the database size. Right: the leakage curve. The
    title gives each retrieval model minus the baseline, all chunks and filtered at α."""
    fig.set_size_inches(14, 4.8)
    ax_curves, ax_db, ax_leak = fig.subplots(1, 3)
    runs = _runs_by_arch(rows)
    _curves(ax_curves, runs)
    _database(ax_db, rows)
    _leakage(ax_leak, rows)
    fig.suptitle(_verdict(rows, runs), fontsize=9)


def _runs_by_arch(rows: list[dict]) -> dict[str, dict[int, dict]]:
    """{arch: {seed: run summary}}."""
    out = defaultdict(dict)
    for row in rows:
        for run in row["metrics"]["runs"]:
            out[run["arch"]][run["seed"]] = run
    return out


def _band(series: list[list[float]]) -> tuple[list, list, list]:
    """(mean, min, max) across seeds, position by position."""
    return ([statistics.mean(v) for v in zip(*series)], [min(v) for v in zip(*series)],
            [max(v) for v in zip(*series)])


def _curves(ax, runs: dict[str, dict[int, dict]]) -> None:
    base_tokens = max((r["tokens"] for r in runs.get("baseline", {}).values()), default=0)
    for i, (arch, label) in enumerate(ARCHS.items()):
        by_seed = runs.get(arch, {})
        if not by_seed:
            continue
        offset = base_tokens if arch == "retrofit" else 0
        keys = ["val_bits_per_byte"] + (["val_bits_per_byte_no_retrieval"] if arch == "retro" else [])
        for key in keys:
            hist = [[m for m in r["history"] if m.get(key) is not None] for r in by_seed.values()]
            n = min(map(len, hist))
            tokens = [offset + m["tokens"] for m in hist[0][:n]]
            mean, low, high = _band([[m[key] for m in h[:n]] for h in hist])
            off = key.endswith("no_retrieval")
            ax.plot(tokens, mean, color=f"C{i}", ls=":" if off else "-", marker="o", ms=3,
                    label=f"{label}{', retrieval off' if off else ''} ({len(by_seed)} seeds)")
            ax.fill_between(tokens, low, high, color=f"C{i}", alpha=0.15)
    ax.set_xlabel("tokens seen (RETRO-fit: after its baseline's)")
    ax.set_ylabel("validation bits per byte")
    ax.legend(fontsize=7)


def _database(ax, rows: list[dict]) -> None:
    """Each retrieval model's bits per byte with databases of a growing share of the
    training set (RETRO Table 14's axis, at laptop scale), the baseline as a line."""
    per = [r["metrics"]["database"] for r in rows]
    tokens = [d["tokens"] for d in per[0]]
    for i, arch in enumerate(ARCHS):
        mean, low, high = _band([[d[arch] for d in p] for p in per])
        if arch == "baseline":
            ax.axhline(mean[0], color="C0", ls="--", label=ARCHS[arch])
            continue
        ax.plot(tokens, mean, color=f"C{i}", marker="o", label=ARCHS[arch])
        ax.fill_between(tokens, low, high, color=f"C{i}", alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("database size (tokens)")
    ax.set_ylabel("validation bits per byte")
    ax.legend(fontsize=7)


def _leakage(ax, rows: list[dict]) -> None:
    """Each model's loss over the chunks with r(C) <= α, at the αs every seed has chunks for."""
    per = [{d["alpha"]: d for d in r["metrics"]["leakage"]} for r in rows]
    alphas = sorted(set.intersection(*(set(p) for p in per)))
    for i, arch in enumerate(ARCHS):
        mean, low, high = _band([[p[a][arch] for a in alphas] for p in per])
        ax.plot(alphas, mean, color=f"C{i}", marker="o", label=ARCHS[arch])
        ax.fill_between(alphas, low, high, color=f"C{i}", alpha=0.15)
    kept = statistics.mean(p[LEAKAGE_ALPHA]["fraction"] for p in per) \
        if LEAKAGE_ALPHA in alphas else None
    ax.set_xlabel("α: chunks whose overlap with their neighbours r(C) ≤ α"
                  + (f"\n(α = {LEAKAGE_ALPHA}: {kept:.0%} of the chunks)" if kept is not None else ""))
    ax.set_ylabel("validation loss (nats/token, chunks 2..C)")
    ax.legend(fontsize=7)


def _verdict(rows: list[dict], runs: dict[str, dict[int, dict]]) -> str:
    """Seed-paired differences against the baseline: all chunks (bits per byte) and the
    leakage-filtered ones (nats per token), and what they mean at this scale."""
    final = lambda arch: {s: r["val_bits_per_byte"] for s, r in runs.get(arch, {}).items()}
    leak = lambda arch: {r["metrics"]["runs"][0]["seed"]: d[arch] for r in rows
                         for d in r["metrics"]["leakage"] if d["alpha"] == LEAKAGE_ALPHA
                         and d[arch] is not None}
    lines = []
    for arch in ("retro", "retrofit"):
        if not runs.get(arch):
            continue
        all_chunks = compare.difference(final(arch), final("baseline"))
        filtered = compare.difference(leak(arch), leak("baseline"))
        lines.append(f"{ARCHS[arch]} − baseline: {all_chunks.text('bits/byte')}; on chunks "
                     f"with r(C) ≤ {LEAKAGE_ALPHA}: {filtered.text('nats/token')}")
    return "Validation, retrieval models minus the baseline in these runs:\n" + "\n".join(lines)
