"""What Dense's hand-written backward buys: the train step with it and with autodiff's.

    python benchmarks/dense_backward.py [--models tiny,small,b-palm] [--rounds 5]

``palmlite.layers.matmul`` writes the dense layer's backward out so that its weight
gradient transposes the narrower operand (see its docstring). The peer here is the same
layer left to autodiff (``jnp.tensordot`` over the kernel's input axes, what Dense did
before): both train steps are compiled in one process and timed in interleaved rounds
(``steps`` steps each, one step per call as in ``retro_step.py``), and the table gives the
median ms/step of each and their ratio. Float32, B 16 x T 128 unless the model names its own
shape. Run it on an idle machine (the default models take ~5 minutes on 2 cores; b-palm,
train_step.py's shape (b) with PaLM's toggles, adds ~4).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from palmlite import layers, presets
from palmlite.train_config import TrainConfig

from retro_step import compiled_step
from train_step import CPU_SHAPES, GPT2, PALM, model_config


def autodiff_dense(self, x: jax.Array) -> jax.Array:
    """Dense as autodiff sees it: one tensordot, its transpose rule for the backward."""
    y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.n_in)
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def model(name: str):
    """(ModelConfig, TrainConfig) of a preset (vocabulary 2048, T 128, B 16) or of one of
    train_step.py's CPU shapes with GPT-2's or PaLM's toggles ('a-gpt2', 'b-palm')."""
    if name[:2] in ("a-", "b-"):
        shape = CPU_SHAPES[name[0]][0]
        cfg = model_config(shape, GPT2 if name.endswith("gpt2") else PALM)
        return cfg, TrainConfig(batch_size=shape["batch"], seq_len=shape["seq"], steps=1000,
                                tokenizer="bytes")
    cfg = presets.get(name, vocab_size=2048, max_seq_len=128)
    return cfg, TrainConfig(batch_size=16, seq_len=128, steps=1000, tokenizer="bytes")


def median_ms(runner: dict, steps: int) -> float:
    step, state, batch = runner["step"], runner["state"], runner["batch"]
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    runner["state"] = state
    return 1e3 * (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,small,small-retro,a-gpt2,a-palm")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    hand_written = layers.Dense.__call__
    print(f"device {jax.devices()[0].device_kind}; median of {args.rounds} interleaved rounds "
          f"of {args.steps} steps")
    print(f"{'model':>12} {'autodiff ms':>12} {'written ms':>11} {'speed-up':>9}")
    for name in args.models.split(","):
        cfg, tc = model(name)
        runners = {}
        for label, call in (("autodiff", autodiff_dense), ("written", hand_written)):
            layers.Dense.__call__ = call  # read when the step is traced, inside compiled_step
            step, state, batch = compiled_step(cfg, tc)
            runners[label] = dict(step=step, state=state, batch=batch)
        layers.Dense.__call__ = hand_written
        ms = {label: [] for label in runners}
        for _ in range(args.rounds):
            for label, runner in runners.items():
                ms[label].append(median_ms(runner, args.steps))
        ratios = [a / w for a, w in zip(ms["autodiff"], ms["written"])]
        print(f"{name:>12} {statistics.median(ms['autodiff']):>12.1f} "
              f"{statistics.median(ms['written']):>11.1f} {statistics.median(ratios):>8.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
