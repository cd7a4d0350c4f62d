"""Pathways' figure: one model on many domains, dense vs token-, task- and map-routed MoEs.

Each results row is one model of notebook 11 (``metrics.runs``: a ``TrainResult.summary()``
with its ``arch``, the domains' names, ``expert_use`` Z x L x E and ``specialisation`` per
MoE layer in bits; ``palmlite.routing``). The figure has three panels:

- each domain's final validation bits per byte, every MoE minus the dense twin, seed by
  seed, with its 90% interval (``compare.difference``);
- which expert each domain uses, layer by layer, for the first seed of each routed MoE;
- the mutual information between domain and expert per layer (0: the experts ignore the
  domain; log2 Z: the expert names the domain).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from palmlite.routing import ARCHS
from palmlite.studies import compare

ROUTED = ("token", "task", "fixed")


def pathways(rows: list[dict], fig, varied: list[str]) -> None:
    runs = _runs_by_arch(rows)
    fig.set_size_inches(15, 4.8)
    ax_loss, ax_use, ax_mi = fig.subplots(1, 3, gridspec_kw=dict(width_ratios=[1.2, 1.3, 0.8]))
    names = next(iter(next(iter(runs.values())).values()))["domains"]
    diffs = domain_differences(runs, names)
    _loss_panel(ax_loss, diffs, names)
    _use_panel(ax_use, runs, names)
    _mi_panel(ax_mi, runs)
    fig.suptitle(_verdict(diffs, names), fontsize=8)


def _runs_by_arch(rows: list[dict]) -> dict[str, dict[int, dict]]:
    out = defaultdict(dict)
    for run in (run for row in rows for run in row["metrics"]["runs"]):
        out[run["arch"]][run["seed"]] = run
    return out


def domain_differences(runs: dict, names: list[str]) -> dict[str, dict[str, compare.Difference]]:
    """{arch: {domain: final bits/byte of the arch minus the dense twin's}}, seed-paired."""
    final = lambda arch, name: {seed: r["val_bits_per_byte_by_domain"][name]
                                for seed, r in runs.get(arch, {}).items()}
    return {arch: {name: compare.difference(final(arch, name), final("dense", name))
                   for name in names}
            for arch in ROUTED if arch in runs and "dense" in runs}


def _loss_panel(ax, diffs: dict, names: list[str]) -> None:
    if not diffs:
        return _empty(ax, "no MoE with a dense twin in these runs")
    width = 0.8 / max(1, len(diffs))
    for i, (arch, by_domain) in enumerate(diffs.items()):
        x = np.arange(len(names)) + (i - (len(diffs) - 1) / 2) * width
        d = [by_domain[n] for n in names]
        y = [v.diff for v in d]
        err = [[v.diff - v.low if v.low is not None else 0 for v in d],
               [v.high - v.diff if v.high is not None else 0 for v in d]]
        ax.bar(x, y, width, color=f"C{i + 1}", label=ARCHS[arch])
        if all(v.low is not None for v in d):  # one seed: no interval to draw
            ax.errorbar(x, y, yerr=err, fmt="none", ecolor="k", capsize=3, lw=0.8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(names)), [_short(n) for n in names], fontsize=8)
    ax.set_ylabel("final validation bits/byte, minus the dense twin\n"
                  f"(seed-paired mean, {compare.LEVEL:.0%} interval)")
    ax.legend(fontsize=7)


def _use_panel(ax, runs: dict, names: list[str]) -> None:
    """Rows: domains; columns: experts of layer 1 | layer 2 | ... for each routed arch."""
    if not any(arch in runs for arch in ROUTED):
        return _empty(ax, "no routed MoE in these runs")
    blocks, labels = [], []
    for arch in ROUTED:
        if arch not in runs:
            continue
        use = np.asarray(runs[arch][min(runs[arch])]["expert_use"])  # Z x L x E
        Z, L, E = use.shape
        blocks.append(use.reshape(Z, L * E))
        blocks.append(np.full((Z, 1), np.nan))
        labels += [f"{arch}\nL{layer + 1}" if e == 0 else "" for layer in range(L)
                   for e in range(E)] + [""]
    image = np.concatenate(blocks[:-1], axis=1)
    shown = ax.imshow(image, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=8)
    ax.set_xticks(range(len(labels[:-1])), labels[:-1], fontsize=6)
    ax.set_title("share of each domain's tokens per expert (first seed)", fontsize=8)
    ax.figure.colorbar(shown, ax=ax, fraction=0.04)


def _mi_panel(ax, runs: dict) -> None:
    if not any(arch in runs for arch in ROUTED):
        return _empty(ax, "no routed MoE in these runs")
    for i, arch in enumerate(ROUTED):
        if arch not in runs:
            continue
        mi = np.array([r["specialisation"] for r in runs[arch].values()])  # seeds x L
        layers = np.arange(1, mi.shape[1] + 1)
        ax.plot(layers, mi.mean(0), "os^"[i] + "-:-"[i], color=f"C{i + 1}", label=ARCHS[arch],
                ms=9 - 2 * i)  # the task router can reach the fixed map's value: both show
        ax.fill_between(layers, mi.min(0), mi.max(0), color=f"C{i + 1}", alpha=0.2)
    ax.set_xlabel("MoE layer")
    ax.set_xticks(layers)
    ax.set_ylabel("I(domain; expert), bits")
    ax.legend(fontsize=7)


def _verdict(diffs: dict, names: list[str]) -> str:
    lines = []
    for arch, by_domain in diffs.items():
        parts = "; ".join(f"{_short(n)} {d.text('bits/byte')}" for n, d in by_domain.items())
        lines.append(f"{ARCHS[arch]} − dense: {parts}")
    return "Per-domain validation, each MoE minus its dense twin in these runs:\n" + "\n".join(lines)


def _empty(ax, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=9, transform=ax.transAxes)
    ax.set_axis_off()


def _short(name: str) -> str:
    return name.split(":")[0]


def token_control(ax, control: dict, names: list[str], layer: int = 0) -> None:
    """The token-identity control of one model: for each token (columns) the share of its
    occurrences in each domain (bars) sent to each expert, at one MoE layer, stacked."""
    tokens = list(control["shares"])
    E = np.asarray(control["shares"][tokens[0]]).shape[-1]
    width = 0.8 / len(names)
    for z, name in enumerate(names):
        x = np.arange(len(tokens)) + (z - (len(names) - 1) / 2) * width
        bottom = np.zeros(len(tokens))
        for e in range(E):
            share = np.nan_to_num([np.asarray(control["shares"][t])[z, layer, e] for t in tokens])
            ax.bar(x, share, width * 0.95, bottom=bottom, color=f"C{e}",
                   label=f"expert {e}" if z == 0 else None, edgecolor="white", lw=0.3)
            bottom += share
        for xi, t in zip(x, tokens):
            ax.text(xi, 1.02, _short(name)[:4], ha="center", fontsize=5, rotation=90)
    ax.set_xticks(range(len(tokens)), [repr(t) for t in tokens])
    ax.set_ylim(0, 1.25)
    ax.set_ylabel(f"share of the token's occurrences (MoE layer {layer + 1})")
    ax.legend(fontsize=7, ncol=E)


def knock_out_panel(ax, knock: dict, names: list[str]) -> None:
    """Δ loss per domain when one expert of one layer is knocked out (rows: layer·expert)."""
    delta = np.asarray(knock["delta"])  # L x E x Z
    L, E, Z = delta.shape
    shown = ax.imshow(delta.reshape(L * E, Z), cmap="magma_r", aspect="auto")
    ax.set_xticks(range(Z), [_short(n) for n in names], fontsize=8)
    ax.set_yticks(range(L * E), [f"L{layer + 1} e{e}" for layer in range(L) for e in range(E)],
                  fontsize=7)
    ax.set_title("Δ validation loss (nats/token) with one expert knocked out", fontsize=8)
    ax.figure.colorbar(shown, ax=ax, fraction=0.05)


def pathways_balance(rows: list[dict], fig, varied: list[str]) -> None:
    """Token routing with the load-balancing loss over each sequence or over the batch
    (``MoEConfig.balance_scope``): per-domain bits/byte, sequence minus batch, seed-paired;
    and I(domain; expert) per layer for each scope. Every sequence is one domain, so
    balancing each sequence forbids a domain its own experts; balancing the batch allows it."""
    runs = defaultdict(dict)  # scope -> seed -> run
    for run in (run for row in rows for run in row["metrics"]["runs"]):
        runs[run["model"]["moe"]["balance_scope"]][run["seed"]] = run
    fig.set_size_inches(11, 4.2)
    ax_loss, ax_mi = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1.2, 1]))
    names = next(iter(next(iter(runs.values())).values()))["domains"]
    final = lambda scope, name: {s: r["val_bits_per_byte_by_domain"][name]
                                 for s, r in runs.get(scope, {}).items()}
    if {"sequence", "batch"} <= set(runs):
        diffs = {n: compare.difference(final("sequence", n), final("batch", n)) for n in names}
        _scope_panel(ax_loss, diffs, names)
        fig.suptitle("Per-domain validation, balance over each sequence minus over the batch:\n"
                     + "; ".join(f"{_short(n)} {d.text('bits/byte')}" for n, d in diffs.items()),
                     fontsize=8)
    else:
        _empty(ax_loss, f"only balance_scope={sorted(runs)} in these runs: nothing to compare")
    for i, scope in enumerate(sorted(runs)):
        mi = np.array([r["specialisation"] for r in runs[scope].values()])  # seeds x L
        layers = np.arange(1, mi.shape[1] + 1)
        ax_mi.plot(layers, mi.mean(0), "os"[i % 2] + "-", color=f"C{i}",
                   label=f"balance over each {scope}")
        ax_mi.fill_between(layers, mi.min(0), mi.max(0), color=f"C{i}", alpha=0.2)
        ax_mi.set_xticks(layers)
    ax_mi.set_xlabel("MoE layer")
    ax_mi.set_ylabel("I(domain; expert), bits (seed mean, range)")
    ax_mi.legend(fontsize=7)


def _scope_panel(ax, diffs: dict, names: list[str]) -> None:
    d = [diffs[n] for n in names]
    x = np.arange(len(names))
    ax.bar(x, [v.diff for v in d], 0.6, color="C0")
    if all(v.low is not None for v in d):
        ax.errorbar(x, [v.diff for v in d], yerr=[[v.diff - v.low for v in d],
                                                  [v.high - v.diff for v in d]],
                    fmt="none", ecolor="k", capsize=3, lw=0.8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, [_short(n) for n in names], fontsize=8)
    ax.set_ylabel("final validation bits/byte, sequence − batch\n"
                  f"(seed-paired mean, {compare.LEVEL:.0%} interval)")
