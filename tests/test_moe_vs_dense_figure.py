"""The moe_vs_dense figure, drawn from synthetic study rows (no training)."""

import matplotlib.pyplot as plt
import pytest

from palmlite.studies.figures import FIGURES, make_figures

BASE = dict(n_layers=2, d_model=64)
MOE = dict(BASE, d_ff=256, moe=dict(n_experts=4, top_k=2))
DENSE = dict(BASE, d_ff=384, moe=None)


def run(model: dict, seed: int, losses: list[float], flops_per_token: float, load=None) -> dict:
    """One run as notebook 06 records it (only the fields the figure reads)."""
    history = [dict(tokens=1000 * (i + 1), val_loss=v) for i, v in enumerate(losses)]
    if load is not None:
        history[0]["expert_load"] = [0.25] * 4  # an earlier interval: not the final load
        history[-1]["expert_load"] = load
        history[-1]["dropped_fraction"] = 0.01 * (seed + 1)
    return dict(model=model, seed=seed, history=history, val_loss=losses[-1],
                flops_per_token=flops_per_token)


def rows(moe_losses: tuple[list, list], dense_losses: tuple[list, list]) -> list[dict]:
    runs = [run(MOE, 0, moe_losses[0], 2.0e6, [0.1, 0.4, 0.2, 0.3]),
            run(MOE, 1, moe_losses[1], 2.0e6, [0.3, 0.2, 0.2, 0.3]),
            run(DENSE, 0, dense_losses[0], 1.9e6), run(DENSE, 1, dense_losses[1], 1.9e6)]
    meta = dict(device={"kind": "cpu"}, corpus={"name": "pystdlib", "fingerprint": "0123456789ab"})
    return [dict(point=f"p{i}", status="ok", params={}, metrics=dict(meta, runs=[r]))
            for i, r in enumerate(runs)]


def draw(rows_: list[dict]):
    fig = plt.figure()
    FIGURES["moe_vs_dense"](rows_, fig, ["model", "seed"])
    return fig


def test_plotted_series_are_the_seed_means_of_the_rows():
    fig = draw(rows(([6.0, 5.0], [6.2, 5.2]), ([6.0, 5.5], [6.0, 5.7])))
    ax_tokens, ax_flops, ax_load = fig.axes
    dense, moe = ax_tokens.lines  # dense first
    assert list(dense.get_xdata()) == [1000, 2000]
    assert list(moe.get_ydata()) == pytest.approx([6.1, 5.1])
    assert list(dense.get_ydata()) == pytest.approx([6.0, 5.6])
    assert list(ax_flops.lines[1].get_xdata()) == pytest.approx([2.0e9, 4.0e9])  # tokens × FLOPs/token
    assert list(ax_flops.lines[0].get_xdata()) == pytest.approx([1.9e9, 3.8e9])
    # Final loads sorted within each run, then averaged by rank: [0.4,0.3,0.2,0.1], [0.3,0.3,0.2,0.2].
    assert [b.get_height() for b in ax_load.patches] == pytest.approx([0.35, 0.3, 0.2, 0.15])
    (uniform,) = [c for c in ax_load.collections if c.get_label() == "uniform 1/E"]
    assert uniform.get_segments()[0][:, 1] == pytest.approx([0.25, 0.25])
    assert ax_load.get_title() == "dropped token-slots at the end: 1.5%"  # mean of 1% and 2%
    title = fig.get_suptitle()
    assert "-0.500 nats" in title and "MoE better" in title
    plt.close(fig)


@pytest.mark.parametrize("moe, dense, verdict", [
    (([6.0, 5.6], [6.0, 5.5]), ([6.0, 5.5], [6.0, 5.6]), "no clear difference"),
    (([6.0, 5.9], [6.0, 5.9]), ([6.0, 5.5], [6.0, 5.5]), "MoE worse, unlike GLaM"),
])
def test_title_says_what_the_runs_show(moe, dense, verdict):
    fig = draw(rows(moe, dense))
    assert verdict in fig.get_suptitle()
    plt.close(fig)


def test_one_seed_says_the_noise_is_unknown():
    fig = draw(rows(([6.0, 5.0], [6.0, 5.0]), ([6.0, 5.5], [6.0, 5.5]))[::2])  # seed 0 only
    assert "one seed: noise unknown" in fig.get_suptitle()
    plt.close(fig)


def test_make_figures_writes_png_and_svg(tmp_path):
    class Study:  # what make_figures reads of a study
        figures = {"moe_vs_dense": "moe_vs_dense"}

        def varied(self):
            return ["model", "seed"]

    files = make_figures(Study(), rows(([6.0, 5.0], [6.2, 5.2]), ([6.0, 5.5], [6.0, 5.7])), tmp_path)
    assert sorted(f.name for f in files) == ["moe_vs_dense.png", "moe_vs_dense.svg"]
    assert all(f.stat().st_size > 1000 for f in files)
