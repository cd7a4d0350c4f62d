"""The ablation dot plot, the expert sweep and the statistics they state, from synthetic
results rows (no training)."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy import stats

from palmlite.studies import compare
from palmlite.studies.figures import FIGURES, _first_crossing


# ---- compare ---------------------------------------------------------------------------------
def test_paired_difference_is_a_t_interval_on_the_seed_differences():
    a, b = {0: 3.10, 1: 3.25, 2: 3.02}, {0: 3.00, 1: 3.14, 2: 2.95}
    d = compare.difference(a, b)
    diffs = [0.10, 0.11, 0.07]
    half = stats.t.ppf(0.95, 2) * np.std(diffs, ddof=1) / np.sqrt(3)
    assert d.paired and d.n == 3
    assert d.diff == pytest.approx(np.mean(diffs))
    assert (d.low, d.high) == pytest.approx((np.mean(diffs) - half, np.mean(diffs) + half))
    assert d.resolved and "+0.093" in d.text()
    # The same numbers unpaired (different seeds): Welch's interval, much wider.
    w = compare.difference({10 + k: v for k, v in a.items()}, b)
    assert not w.paired and w.diff == pytest.approx(d.diff) and w.high - w.low > d.high - d.low


def test_one_seed_has_no_interval_and_says_so():
    d = compare.difference({0: 3.0}, {0: 2.9})
    assert d.low is None and not d.resolved and "noise unknown" in d.text()
    assert compare.seed_std([{0: 1.0}, {0: 2.0}]) is None
    assert "unknown" in compare.resolution(None, 0.05, "x")


def test_resolution_compares_the_noise_with_a_third_of_the_effect():
    assert compare.seed_std([{0: 1.0, 1: 1.2}, {0: 2.0, 1: 2.2}]) == pytest.approx(np.sqrt(0.02))
    assert "not resolving" in compare.resolution(0.02, 0.05, "x")
    paired = compare.difference({0: 3.1, 1: 3.3}, {0: 3.0, 1: 3.1})  # d = 0.1, 0.2
    welch = compare.difference({0: 3.1, 1: 3.3}, {5: 3.0, 6: 3.1})
    assert paired.seed_std == pytest.approx(np.std([0.1, 0.2], ddof=1))
    assert welch.seed_std == pytest.approx(np.sqrt(np.var([3.1, 3.3], ddof=1) + np.var([3.0, 3.1], ddof=1)))
    assert compare.difference_noise([paired, welch]) == pytest.approx(
        np.sqrt((paired.seed_std ** 2 + welch.seed_std ** 2) / 2))
    assert ": resolving" in compare.resolution(0.016, 0.05, "x")


# ---- the ablation dot plot -------------------------------------------------------------------
def ablation_rows():
    """A baseline and a serial variant, three seeds, each at two learning rates: the
    baseline is best at 1e-3, the variant at 3e-3; the variant is worse by 0.1 (+ noise)."""
    rows, noise = [], {0: 0.0, 1: 0.01, 2: -0.01}
    for block, best_lr, offset in (("parallel", 1e-3, 0.0), ("serial", 3e-3, 0.1)):
        for lr in (1e-3, 3e-3):
            for seed in (0, 1, 2):
                loss = 3.0 + offset + noise[seed] + (0.0 if lr == best_lr else 0.2) + 0.001 * seed * (block == "serial")
                rows.append(dict(point=f"{block},{lr},{seed}", status="ok",
                                 params=dict(block=block, lr=lr, seed=seed),
                                 metrics=dict(val_loss=loss)))
    # A third variant, so the baseline is the most common value of `block`.
    for lr in (1e-3, 3e-3):
        for seed in (0, 1, 2):
            rows.append(dict(point=f"x{lr}{seed}", status="ok",
                             params=dict(block="parallel", lr=lr, seed=seed, position="learned"),
                             metrics=dict(val_loss=3.05 + noise[seed])))
    for r in rows:
        r["params"].setdefault("position", "rope")
    return rows


def test_ablation_dot_plot_compares_each_variant_at_its_best_lr_seed_by_seed():
    fig = plt.figure()
    FIGURES["ablation"](ablation_rows(), fig, ["block", "position", "lr", "seed"])
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["position=learned (lr 0.001)", "block=serial (lr 0.003)"]  # best lr each
    dots = [line for line in ax.lines if line.get_marker() == "o"]
    assert [line.get_xdata()[0] for line in dots] == pytest.approx([0.05, 0.101])
    assert any(line.get_xdata()[0] == 0 for line in ax.lines if line.get_linestyle() == "-")  # zero line
    title = ax.get_title(loc="left")
    assert "baseline (baseline, lr 0.001: 3.000 nats), 3 seed(s)" in title
    assert "block=serial: +0.101 nats" in title and "resolved" in title
    plt.close(fig)


# ---- the expert sweep ------------------------------------------------------------------------
def moe_run(E, seed, losses):
    model = dict(n_layers=2, d_model=64, d_ff=256,
                 moe=None if E == 1 else dict(n_experts=E, top_k=1))
    history = [dict(tokens=1000 * (i + 1), val_loss=v) for i, v in enumerate(losses)]
    if E > 1:
        history[-1]["dropped_fraction"] = 0.01 * E  # the last value is the one shown
        history[0]["dropped_fraction"] = 0.5
    return dict(model=model, seed=seed, history=history, val_loss=losses[-1])


def test_expert_sweep_draws_loss_against_experts_and_the_speedup():
    curves = {1: [4.0, 3.0, 2.6, 2.4], 2: [4.0, 2.9, 2.5, 2.3], 4: [3.9, 2.8, 2.4, 2.2]}
    runs = [moe_run(E, seed, [v + 0.01 * seed for v in curve])
            for E, curve in curves.items() for seed in (0, 1, 2)]
    rows = [dict(point=str(i), status="ok", params={}, metrics=dict(runs=[r]))
            for i, r in enumerate(runs)]
    fig = plt.figure()
    FIGURES["expert_sweep"](rows, fig, ["model", "n_experts", "seed"])
    ax_e, ax_t = fig.axes
    (means,) = [line for line in ax_e.lines if line.get_label() == "mean over seeds"]
    assert list(means.get_xdata()) == [1, 2, 4]
    assert list(means.get_ydata()) == pytest.approx([2.41, 2.31, 2.21])
    assert [t.get_text() for t in ax_e.texts] == ["2.0% dropped", "4.0% dropped"]
    title = fig.get_suptitle()
    assert "E=2: -0.100 nats [-0.100, -0.100]" in title and "E=4: -0.200 nats" in title
    # Dense ends at 2.41; E=4's mean curve (…, 2.41 at 3000, 2.21 at 4000) reaches it at
    # 3000 tokens: 4000 / 3000 = 1.33x sooner.
    assert "E=4" in title and "1.33× sooner" in title
    assert "seed noise of a difference 0.000 nats" in title and ": resolving" in title
    plt.close(fig)


def test_first_crossing_interpolates():
    assert _first_crossing([1, 2, 3], [5.0, 4.0, 3.0], 3.5) == pytest.approx(2.5)
    assert _first_crossing([1, 2, 3], [5.0, 4.0, 3.0], 2.0) is None


def test_both_figures_draw_from_a_results_file(tmp_path):
    """Through the files a sweep writes: results rows on disk, the study's figure names."""
    from palmlite.studies import load_study, read_results, write_result
    from palmlite.studies.figures import make_figures
    spec = tmp_path / "s.yaml"
    (tmp_path / "nb.ipynb").write_text(json.dumps({"cells": [{
        "cell_type": "code", "metadata": {"tags": ["parameters"]},
        "source": "block = 'parallel'\nseed = 0\n"}]}))
    spec.write_text("name: s\nnotebook: nb.ipynb\ngrid: {product: {block: [parallel, serial]}}\n"
                    "seeds: [0, 1, 2]\nfigures: {ablation: abl, expert_sweep: experts}\n")
    study = load_study(spec)
    results = tmp_path / "s.jsonl"
    for i, r in enumerate(ablation_rows()):
        curve = [4.0, 3.0, r["metrics"]["val_loss"]]
        E = 1 if r["params"]["block"] == "parallel" else 4
        r["metrics"]["runs"] = [moe_run(E, r["params"]["seed"], curve)]
        write_result(results, dict(r, point=f"p{i}"))
    files = make_figures(study, read_results(results), tmp_path / "figures")
    assert sorted(f.name for f in files) == ["abl.png", "abl.svg", "experts.png", "experts.svg"]
    assert all(f.stat().st_size > 10_000 for f in files)
    # Issue 14, item 7: redrawing unchanged results gives the same bytes (git stays clean).
    again = make_figures(study, read_results(results), tmp_path / "again")
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in again]


def test_ablation_draws_the_gap_along_training_when_runs_have_a_history():
    rows = ablation_rows()
    for r in rows:  # a gap that closes: 3x the final gap at the first evaluation
        final = r["metrics"]["val_loss"]
        r["metrics"]["history"] = [dict(tokens=100, val_loss=4.0 + 3 * (final - 3.0)),
                                   dict(tokens=200, loss=3.5), dict(tokens=300, val_loss=final)]
    fig = plt.figure()
    FIGURES["ablation"](rows, fig, ["block", "position", "lr", "seed"])
    ax_dots, ax_gap = fig.axes
    serial = next(line for line in ax_gap.lines if line.get_label() == "block=serial (lr 0.003)"
                  or line.get_label() == "block=serial")
    assert list(serial.get_xdata()) == [100, 300]
    assert list(serial.get_ydata()) == pytest.approx([3 * 0.101, 0.101])
    plt.close(fig)


def test_a_figure_missing_a_metric_names_the_metric_and_the_point(tmp_path):
    """Issue 13, item 10: a notebook that did not record what a figure reads gets one clear
    error naming both, not a KeyError at the end of the sweep."""
    from palmlite.studies import load_study
    from palmlite.studies.figures import make_figures
    spec = tmp_path / "s.yaml"
    (tmp_path / "nb.ipynb").write_text(json.dumps({"cells": [{
        "cell_type": "code", "metadata": {"tags": ["parameters"]},
        "source": "block = 'parallel'\nseed = 0\n"}]}))
    spec.write_text("name: s\nnotebook: nb.ipynb\ngrid: {product: {block: [parallel, serial]}}\n"
                    "seeds: [0, 1]\nfigures: {ablation: abl}\n")
    rows = [dict(r, point=f"block={r['params']['block']},seed={r['params']['seed']}")
            for r in ablation_rows()]
    del rows[7]["metrics"]["val_loss"]  # a serial run
    with pytest.raises(ValueError, match=f"figure 'ablation' of study 's' needs 'val_loss', "
                                         f"which point '{rows[7]['point']}' did not record"):
        make_figures(load_study(spec), rows, tmp_path / "figures")


def test_an_ablation_with_one_setting_says_so_instead_of_calling_it_baseline():
    """Issue 14, item 7: a partial sweep (--only) labelled its one bar "baseline"."""
    from matplotlib.figure import Figure
    rows = [r for r in ablation_rows() if r["params"]["block"] == "serial"]
    fig = Figure()
    FIGURES["ablation"](rows, fig, ["block", "lr", "seed"])
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("Only one setting has results so far (block=serial)" in t for t in texts)


def test_pathways_compares_each_domain_with_the_dense_twin_seed_by_seed():
    """Notebook 11's figure: per-domain bits/byte of each MoE minus the dense twin, paired
    by seed, in the title; expert use and I(domain; expert) from the rows."""
    names = ["pystdlib", "pydocs"]
    use = {"token": [[[0.5, 0.5]], [[0.5, 0.5]]], "fixed": [[[1.0, 0.0]], [[0.0, 1.0]]]}
    rows = []
    for arch, shift in (("dense", 0.0), ("token", -0.05), ("fixed", 0.1)):
        for seed in (0, 1, 2):
            bpb = {n: 2.0 + i + shift + 0.01 * seed * (arch == "fixed") for i, n in enumerate(names)}
            run = dict(arch=arch, seed=seed, domains=names, val_bits_per_byte_by_domain=bpb)
            if arch != "dense":
                run.update(expert_use=use[arch], specialisation=[1.0 if arch == "fixed" else 0.0])
            rows.append(dict(metrics=dict(runs=[run])))
    fig = plt.figure()
    FIGURES["pathways"](rows, fig, ["arch", "seed"])
    title = fig._suptitle.get_text()
    expected = compare.difference({s: 2.0 + 0.1 + 0.01 * s for s in range(3)}, {s: 2.0 for s in range(3)})
    assert f"pydocs {expected.text('bits/byte')}".split(" [")[0] in title
    assert "token-routed MoE (Switch, GLaM) − dense: pystdlib -0.050 bits/byte" in title
    assert "task-routed" not in title  # no such runs: no bars, no line
    plt.close(fig)


def test_pathways_with_only_dense_runs_says_so_instead_of_failing():
    """Notebook 11 draws the figure of one point (arch=dense): there is nothing to route."""
    run = dict(arch="dense", seed=0, domains=["pydocs"], val_bits_per_byte_by_domain={"pydocs": 2.0})
    fig = plt.figure()
    FIGURES["pathways"]([dict(metrics=dict(runs=[run]))], fig, ["seed"])
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "no routed MoE in these runs" in texts
    assert "no MoE with a dense twin in these runs" in texts
    plt.close(fig)


def test_pathways_balance_pairs_sequence_with_batch_scope_by_seed():
    names = ["pystdlib", "pydocs"]
    rows = []
    for scope, shift, mi in (("batch", 0.0, [0.2, 0.4]), ("sequence", 0.03, [0.0, 0.1])):
        for seed in (0, 1, 2):
            bpb = {n: 2.0 + i + shift + 0.001 * seed * (scope == "sequence") for i, n in enumerate(names)}
            rows.append(dict(metrics=dict(runs=[dict(
                arch="token", seed=seed, domains=names, val_bits_per_byte_by_domain=bpb,
                specialisation=mi, model=dict(moe=dict(balance_scope=scope)))])))
    fig = plt.figure()
    FIGURES["pathways_balance"](rows, fig, ["balance_scope", "seed"])
    expected = compare.difference({s: 2.03 + 0.001 * s for s in range(3)}, {s: 2.0 for s in range(3)})
    assert f"pystdlib {expected.text('bits/byte')}" in fig._suptitle.get_text()
    lines = {l.get_label(): l.get_ydata().tolist() for l in fig.axes[1].get_lines()}
    assert lines == {"balance over each batch": pytest.approx([0.2, 0.4]),
                     "balance over each sequence": pytest.approx([0.0, 0.1])}
    plt.close(fig)
    fig = plt.figure()  # one scope so far: the comparison panel says so
    FIGURES["pathways_balance"](rows[:3], fig, ["seed"])
    assert any("nothing to compare" in t.get_text() for ax in fig.axes for t in ax.texts)
    plt.close(fig)
