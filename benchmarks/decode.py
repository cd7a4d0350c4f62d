"""Decoding throughput with and without the KV cache, for multi-head, grouped and multi-query.

    python benchmarks/decode.py [--preset small] [--contexts 128 512 1024] [--batch 8]

PaLM §2 chose multi-query attention for decoding: each step reads the whole KV cache, and
one K/V head instead of n_heads makes it n_heads times smaller. This prints, per attention
variant and context length, the cache bytes per sequence and the median decode tokens/s
(compile and prefill excluded) with the cache and with full recomputation at every step.

Decode time is t(prefill + n tokens) - t(prefill + 1 token), so the prompt's cost cancels.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import palmlite as pl
from palmlite.attention import init_cache
from palmlite.generate import generate_tokens


def median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_tokens_per_second(model, prompt_BxT, n_new: int, use_cache: bool, repeats: int):
    def run(n):
        return median_seconds(lambda: generate_tokens(model, prompt_BxT, max_new_tokens=n,
                                                      temperature=0.0, use_cache=use_cache),
                              repeats)
    return prompt_BxT.shape[0] * (n_new - 1) / (run(n_new) - run(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--contexts", nargs="+", type=int, default=[128, 512, 1024])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new", type=int, default=64, help="tokens decoded with the cache")
    parser.add_argument("--new-uncached", type=int, default=8,
                        help="tokens decoded without it (each step costs a full forward)")
    parser.add_argument("--dtype", default="float32", choices=pl.config.DTYPES)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base = pl.presets.get(args.preset)
    n_heads = base.n_heads
    variants = {"MHA": n_heads, "GQA": max(1, n_heads // 2), "MQA": 1}
    print(f"device: {jax.devices()[0].device_kind}  preset {args.preset}  batch {args.batch}  "
          f"dtype {args.dtype}  new tokens {args.new} cached / {args.new_uncached} uncached  "
          f"(median of {args.repeats})")
    header = (f"{'attn':<5}{'K':>3}{'context':>9}{'cache MiB/seq':>15}{'cached tok/s':>14}"
              f"{'uncached tok/s':>16}{'speed-up':>10}")
    print(header + "\n" + "-" * len(header))
    for context in args.contexts:
        for name, n_kv_heads in variants.items():
            cfg = base.replace(n_kv_heads=n_kv_heads, dtype=args.dtype,
                               max_seq_len=context + args.new)
            model = pl.Transformer(cfg, rngs=nnx.Rngs(0))
            prompt_BxT = jax.random.randint(jax.random.key(0), (args.batch, context), 0,
                                            cfg.vocab_size, dtype=jnp.int32)
            cached = decode_tokens_per_second(model, prompt_BxT, args.new, True, args.repeats)
            uncached = decode_tokens_per_second(model, prompt_BxT, args.new_uncached, False,
                                                max(1, args.repeats // 2))
            mib = init_cache(cfg, 1, context + args.new).nbytes / 2**20
            print(f"{name:<5}{n_kv_heads:>3}{context:>9}{mib:>15.2f}{cached:>14,.0f}"
                  f"{uncached:>16,.0f}{cached / uncached:>9.1f}x")


if __name__ == "__main__":
    main()
