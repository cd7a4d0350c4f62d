"""What the sharding layer costs a one-device run (issue #7: at most 5% on a CPU).

    python benchmarks/sharding.py [--repeats 15] [--steps 10]

The same train step, float32, timed two ways on one device: ``mesh=None`` (plain ``jax.jit``,
batches by ``jnp.asarray``) and ``mesh="data=1"`` (state created by a sharded ``jit``, step
jitted with in/out shardings, batches placed by ``sharding.place_batch``). Each timed block
is ``--steps`` steps including the host-to-device copy of the batch, the way ``train()``
feeds them; blocks of the two variants alternate (their order swapped every round) so that
a noisy, shared machine slows both alike. Median time per step over ``--repeats`` blocks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import palmlite as pl
from palmlite import sharding
from palmlite.train import init_state, make_train_step
from palmlite.train_config import TrainConfig

SHAPES = {  # train_step.py's CPU shape (a), and a smaller one where fixed costs weigh more
    "a": dict(n_layers=4, n_heads=4, d_model=128, vocab_size=65, seq=64, batch=12),
    "tiny": dict(n_layers=2, n_heads=4, d_model=64, vocab_size=256, seq=32, batch=8),
}


def model_config(shape: dict) -> pl.ModelConfig:
    return pl.ModelConfig(vocab_size=shape["vocab_size"], d_model=shape["d_model"],
                          n_layers=shape["n_layers"], n_heads=shape["n_heads"], n_kv_heads=1,
                          d_ff=4 * shape["d_model"], max_seq_len=shape["seq"])


def variant(cfg: pl.ModelConfig, tc: TrainConfig, mesh_spec: str | None):
    """(compiled step, state, put): what ``train()`` builds for this mesh."""
    mesh = None if mesh_spec is None else sharding.make_mesh(mesh_spec)
    graphdef, _, tx, state = init_state(cfg, tc, mesh=mesh)
    batch_shape = (tc.batch_size, tc.seq_len + 1)
    if mesh is None:
        step, put = make_train_step(graphdef, tx, tc.z_loss), jnp.asarray
    else:
        batch_sh = sharding.batch_sharding(mesh, batch_shape)
        step = make_train_step(graphdef, tx, tc.z_loss, sharding.state_shardings(state, mesh),
                               batch_sh)
        put = lambda batch: sharding.place_batch(lambda rows: batch[rows], batch.shape, batch_sh)
    step = step.lower(state, jax.ShapeDtypeStruct(batch_shape, jnp.int32)).compile()
    return step, state, put


def bench(shape: dict, repeats: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each variant, timed in alternating blocks."""
    cfg = model_config(shape)
    tc = TrainConfig(batch_size=shape["batch"], seq_len=shape["seq"], tokenizer="bytes")
    batches = np.random.default_rng(0).integers(0, cfg.vocab_size, (steps, tc.batch_size,
                                                                    tc.seq_len + 1), np.int32)
    runs = {name: list(variant(cfg, tc, spec)) for name, spec in (("none", None),
                                                                  ("data=1", "data=1"))}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats + 1):  # round 0 warms up
        for name in (list(runs) if r % 2 else list(runs)[::-1]):
            step, state, put = runs[name]
            t0 = time.perf_counter()
            for batch in batches:
                state, metrics = step(state, put(batch))
            jax.block_until_ready(metrics)
            runs[name][1] = state
            if r:
                times[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, float32; median ms/step over {args.repeats} "
          f"alternating blocks of {args.steps} steps")
    header = f"{'shape':<6}{'params':>10}{'no mesh':>10}{'data=1':>10}{'overhead':>10}"
    print(header + "\n" + "-" * len(header))
    for name, shape in SHAPES.items():
        t = bench(shape, args.repeats, args.steps)
        print(f"{name:<6}{pl.count_params(model_config(shape)):>10,}{t['none'] * 1e3:>10.2f}"
              f"{t['data=1'] * 1e3:>10.2f}{t['data=1'] / t['none'] - 1:>+10.1%}", flush=True)


if __name__ == "__main__":
    main()
