"""Train-step throughput (float32) of palmlite's jitted step at nanoGPT-comparable shapes.

    python benchmarks/train_step.py [--repeats 30]

Shapes (issue #4): (a) 4 layers, 4 heads, d_model 128, T 64, batch 12, vocab 65;
(b) 6 layers, 6 heads, d_model 384, T 256, batch 16, vocab 8192. nanoGPT (PyTorch eager,
CPU) measured 18.3k and 1.42k tokens/s on this class of 2-core machine; target >= 24k and
>= 1.9k. Each shape runs with GPT-2's toggles and with PaLM's. Median of repeated steps,
compilation excluded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import palmlite as pl
from palmlite.config import TrainConfig
from palmlite.train import init_state, make_train_step

SHAPES = {"a": dict(n_layers=4, n_heads=4, d_model=128, vocab_size=65, seq=64, batch=12),
          "b": dict(n_layers=6, n_heads=6, d_model=384, vocab_size=8192, seq=256, batch=16)}
GPT2 = dict(position="learned", activation="gelu", block="serial", norm="layernorm",
            tie_embeddings=True, use_bias=True, kv="mha")
PALM = dict(position="rope", activation="swiglu", block="parallel", norm="layernorm",
            tie_embeddings=True, use_bias=False, kv="mqa")


def model_config(shape: dict, toggles: dict) -> pl.ModelConfig:
    t = dict(toggles)
    n_kv = shape["n_heads"] if t.pop("kv") == "mha" else 1
    d = shape["d_model"]
    # SwiGLU's third matrix: PaLM keeps d_ff = 4d (more parameters); we do the same.
    return pl.ModelConfig(vocab_size=shape["vocab_size"], d_model=d, n_layers=shape["n_layers"],
                          n_heads=shape["n_heads"], n_kv_heads=n_kv, d_ff=4 * d,
                          max_seq_len=shape["seq"], **t)


def bench(cfg: pl.ModelConfig, batch: int, seq: int, repeats: int) -> float:
    tc = TrainConfig(batch_size=batch, seq_len=seq, steps=1000, tokenizer="bytes")
    graphdef, _, tx, state = init_state(cfg, tc)
    x = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)
    step = make_train_step(graphdef, tx, tc.z_loss).lower(state, x).compile()
    for _ in range(3):
        state, m = step(state, x)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = step(state, x)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return batch * seq / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, float32, median of {args.repeats} steps")
    header = f"{'shape':<6}{'toggles':<8}{'params':>12}{'tokens/s':>12}{'nanoGPT':>10}{'target':>10}"
    print(header + "\n" + "-" * len(header))
    reference = {"a": (18_300, 24_000), "b": (1_420, 1_900)}
    for name, shape in SHAPES.items():
        for label, toggles in (("gpt2", GPT2), ("palm", PALM)):
            cfg = model_config(shape, toggles)
            tps = bench(cfg, shape["batch"], shape["seq"], args.repeats)
            ref, target = reference[name] if label == "gpt2" else ("-", "-")
            print(f"{name:<6}{label:<8}{pl.count_params(cfg):>12,}{tps:>12,.0f}"
                  f"{ref:>10}{target:>10}")


if __name__ == "__main__":
    main()
