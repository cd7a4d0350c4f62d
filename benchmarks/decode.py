"""Decoding throughput with and without the KV cache, for multi-head, grouped and multi-query.

    python benchmarks/decode.py [--preset small] [--contexts 128 512 1024] [--batch 8]

PaLM §2 chose multi-query attention for decoding: each step reads the whole KV cache, and
one K/V head instead of n_heads makes it n_heads times smaller. This prints, per attention
variant and context length, the cache bytes per sequence and the median decode tokens/s
(compile and prefill excluded) with the cache and with full recomputation at every step.

Decode time is t(prefill + n tokens) - t(prefill + 1 token), so the prompt's cost cancels
(``palmlite.generate.measure_decoding``, which notebook 07 uses too).
"""

from __future__ import annotations

import argparse

import jax

import palmlite as pl
from palmlite.generate import measure_decoding


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
    base = pl.presets.get(args.preset, dtype=args.dtype)
    print(f"device: {jax.devices()[0].device_kind}  preset {args.preset}  batch {args.batch}  "
          f"dtype {args.dtype}  new tokens {args.new} cached / {args.new_uncached} uncached  "
          f"(median of {args.repeats})")
    header = (f"{'attn':<5}{'K':>3}{'context':>9}{'cache MiB/seq':>15}{'cached tok/s':>14}"
              f"{'uncached tok/s':>16}{'speed-up':>10}")
    print(header + "\n" + "-" * len(header))
    for context in args.contexts:  # one context at a time: rows print as they are measured
        for r in measure_decoding(base, [context], batch=args.batch, new=args.new,
                                  new_uncached=args.new_uncached, repeats=args.repeats):
            cached, uncached = r["cached_tokens_per_s"], r["uncached_tokens_per_s"]
            print(f"{r['attention']:<5}{r['n_kv_heads']:>3}{context:>9}"
                  f"{r['cache_bytes'] / 2**20:>15.2f}{cached:>14,.0f}{uncached:>16,.0f}"
                  f"{cached / uncached:>9.1f}x")


if __name__ == "__main__":
    main()
