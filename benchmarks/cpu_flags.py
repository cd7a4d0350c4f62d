"""One palmlite train step at a study shape, for comparing XLA flags and core pinning.

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/cpu_flags.py i
    taskset -c 0 python benchmarks/cpu_flags.py i & taskset -c 1 python benchmarks/cpu_flags.py i

Prints the median milliseconds per optimizer step over 7 calls of 10 scanned steps (GPT-2
toggles; shapes (i) and (ii) of cpu_vs_nanogpt.py). Run each variant on an idle machine;
the numbers in NOTES.md come from this script.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from palmlite.train import init_state, make_train_step
from palmlite.train_config import TrainConfig
from train_step import GPT2, model_config

SHAPES = {"i": dict(n_layers=2, n_heads=4, d_model=64, vocab_size=259, seq=128, batch=16),
          "ii": dict(n_layers=4, n_heads=4, d_model=128, vocab_size=259, seq=128, batch=16)}
STEPS_PER_CALL = 10


def main(name: str = "i") -> None:
    shape = SHAPES[name]
    tc = TrainConfig(tokenizer="bytes", batch_size=shape["batch"], seq_len=shape["seq"])
    graphdef, _, tx, state = init_state(model_config(shape, GPT2), tc)
    step = make_train_step(graphdef, tx, tc.z_loss, steps_per_call=STEPS_PER_CALL)
    block = np.random.default_rng(0).integers(0, shape["vocab_size"],
                                              (STEPS_PER_CALL, shape["batch"], shape["seq"] + 1))
    block, n_steps = jnp.asarray(block, jnp.int32), jnp.int32(STEPS_PER_CALL)
    state, _ = step(state, block, n_steps)
    jax.block_until_ready(state)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        state, _ = step(state, block, n_steps)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - t0) / STEPS_PER_CALL * 1e3)
    print(f"shape ({name}): median {sorted(times)[3]:.1f} ms per step")


if __name__ == "__main__":
    main(*sys.argv[1:])
