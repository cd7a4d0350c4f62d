"""Forward (and forward+backward) throughput of the Transformer at a few preset sizes.

    python benchmarks/forward.py [--presets tiny small medium] [--batch 8] [--seq 256]

Prints a table of median tokens/s over repeated jitted calls (compile time excluded),
the achieved model FLOP/s, and MFU where the device's peak is known (None on a CPU).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

import palmlite as pl
from palmlite.generate import median_seconds


def bench(preset: str, batch: int, seq: int, dtype: str, repeats: int) -> dict:
    cfg = pl.presets.get(preset, dtype=dtype, max_seq_len=max(seq, pl.presets.get(preset).max_seq_len))
    model = pl.Transformer(cfg, rngs=nnx.Rngs(0))
    x = jax.random.randint(jax.random.key(0), (batch, seq), 0, cfg.vocab_size)
    forward = nnx.jit(lambda m, t: m(t))

    @nnx.jit
    def forward_backward(m, t):
        def loss_fn(m):
            ce, z = pl.cross_entropy_and_z_loss(m(t[:, :-1]), t[:, 1:])
            return ce + 1e-4 * z
        return nnx.grad(loss_fn)(m)

    fwd = median_seconds(lambda: forward(model, x), repeats)
    fwd_bwd = median_seconds(lambda: forward_backward(model, x), repeats)
    tokens = batch * seq
    # flops_per_token counts forward + backward (3x the forward's 2N + attention).
    train_flops = pl.flops_per_token(cfg, seq) * tokens
    peak = pl.device_peak_flops(jax.devices()[0].device_kind)
    return dict(preset=preset, params=pl.count_params(cfg), dtype=dtype,
                fwd_tok_s=tokens / fwd, fwd_bwd_tok_s=tokens / fwd_bwd,
                fwd_bwd_tflops=train_flops / fwd_bwd / 1e12,
                mfu=None if peak is None else train_flops / fwd_bwd / peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "medium"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=pl.config.DTYPES)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} x{jax.device_count()}  batch {args.batch} x seq {args.seq}  "
          f"dtype {args.dtype}  (median of {args.repeats})")
    header = f"{'preset':<10}{'params':>12}{'fwd tok/s':>14}{'fwd+bwd tok/s':>16}{'TFLOP/s':>10}{'MFU':>8}"
    print(header + "\n" + "-" * len(header))
    for preset in args.presets:
        r = bench(preset, args.batch, args.seq, args.dtype, args.repeats)
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{r['preset']:<10}{r['params']:>12,}{r['fwd_tok_s']:>14,.0f}"
              f"{r['fwd_bwd_tok_s']:>16,.0f}{r['fwd_bwd_tflops']:>10.3f}{mfu:>8}")


if __name__ == "__main__":
    main()
