"""Train-step time of a top-2, 8-expert MoE (every other layer) vs its FLOP-matched dense twin.

    python benchmarks/moe.py [--repeats 20]

The MoE is the ``small-moe-8e`` preset (4 layers, d_model 128, experts of d_ff 512) at
T 128, batch 16, in float32; the twin is ``dense_twin`` of it (d_ff 768 on every layer),
so both spend the same model FLOPs per token. Target (issue #5): MoE step <= 1.5x the
dense step on a 2-core CPU, <= 1.3x on a GPU. Both MoE dispatches are timed: GShard's
einsum at capacity factor 1.25 and the dropless grouped matmul (``jax.lax.ragged_dot``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

import palmlite as pl
from palmlite.train import init_state, make_train_step
from palmlite.train_config import TrainConfig

BATCH, SEQ = 16, 128


def compiled_step(cfg: pl.ModelConfig):
    """A warmed-up step closure: each call runs one jitted train step to completion."""
    tc = TrainConfig(batch_size=BATCH, seq_len=SEQ, steps=1000, tokenizer="bytes")
    graphdef, _, tx, state = init_state(cfg, tc)
    x = jax.random.randint(jax.random.key(0), (BATCH, SEQ + 1), 0, cfg.vocab_size)
    step = make_train_step(graphdef, tx, tc.z_loss).lower(state, x).compile()
    box = [state]

    def run():
        box[0], m = step(box[0], x)
        jax.block_until_ready(m)

    for _ in range(3):
        run()
    return run


def median_seconds(runs: dict, repeats: int) -> dict[str, float]:
    """Median step time of each model; the models take turns, so a noisy neighbour on a
    shared machine slows them all alike instead of skewing the ratio."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    moe = pl.presets.get("small-moe-8e", max_seq_len=SEQ)
    models = {"dense twin": pl.dense_twin(moe),
              "moe einsum cf=1.25": moe.replace(moe=moe.moe.replace(capacity_factor=1.25)),
              "moe dropless": moe.replace(moe=moe.moe.replace(capacity_factor=None))}
    print(f"device: {jax.devices()[0].device_kind}, float32, batch {BATCH} x T {SEQ}, "
          f"median of {args.repeats} steps")
    header = (f"{'model':<20}{'params':>10}{'active':>10}{'GFLOPs/step':>13}{'ms/step':>10}"
              f"{'tokens/s':>11}{'vs dense':>10}")
    print(header + "\n" + "-" * len(header))
    seconds = median_seconds({name: compiled_step(cfg) for name, cfg in models.items()},
                             args.repeats)
    for name, cfg in models.items():
        s = seconds[name]
        flops = pl.flops_per_token(cfg, SEQ) * BATCH * SEQ / 1e9
        print(f"{name:<20}{pl.count_params(cfg):>10,}{pl.count_params(cfg, active=True):>10,}"
              f"{flops:>13.2f}{1e3 * s:>10.1f}{BATCH * SEQ / s:>11,.0f}"
              f"{s / seconds['dense twin']:>9.2f}x")

if __name__ == "__main__":
    main()
