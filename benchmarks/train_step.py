"""Train-step throughput of palmlite's jitted step, against nanoGPT at the same shapes.

    python benchmarks/train_step.py [--suite cpu] [--repeats 30]
    python benchmarks/train_step.py --suite gpu [--only 124m 350m] [--attention cudnn xla]

``cpu`` (issue #4), float32: (a) 4 layers, 4 heads, d_model 128, T 64, batch 12, vocab 65;
(b) 6 layers, 6 heads, d_model 384, T 256, batch 16, vocab 8192. nanoGPT (PyTorch eager,
CPU) measured 18.3k and 1.42k tokens/s on this class of 2-core machine; target >= 24k and
>= 1.9k.

``gpu`` (issues #4, #7), bf16 compute with float32 parameters and optimizer state, T 1024,
vocab 50304 as nanoGPT pads it: GPT-2 124M / 350M and GPT-3 XL 1.3B shapes. nanoGPT with
torch.compile reached 456k / 183k / 58.6k tokens/s on an H100 (47% / 54% / 60% MFU of the
825 TFLOP/s bf16 matmul rate measured on that card). MFU here is model FLOPs
(PaLM Appendix B: 6N + 12·L·H·Q·T per token) over that measured rate, and over the
datasheet peak of ``accounting.PEAK_FLOPS``.

Each shape runs with GPT-2's toggles and with PaLM's. Median of repeated steps after
warm-up, compilation excluded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import palmlite as pl
from palmlite.generate import median_seconds
from palmlite.train import init_state, make_train_step
from palmlite.train_config import TrainConfig

GPT2 = dict(position="learned", activation="gelu", block="serial", norm="layernorm",
            tie_embeddings=True, use_bias=True, kv="mha")
PALM = dict(position="rope", activation="swiglu", block="parallel", norm="layernorm",
            tie_embeddings=True, use_bias=False, kv="mqa")
CPU_SHAPES = {  # name: shape, nanoGPT tokens/s, target
    "a": (dict(n_layers=4, n_heads=4, d_model=128, vocab_size=65, seq=64, batch=12), 18_300, 24_000),
    "b": (dict(n_layers=6, n_heads=6, d_model=384, vocab_size=8192, seq=256, batch=16), 1_420, 1_900),
}
GPU_SHAPES = {  # name: shape, nanoGPT (torch.compile, H100) tokens/s
    "124m": (dict(n_layers=12, n_heads=12, d_model=768, vocab_size=50304, seq=1024, batch=16), 456_000),
    "350m": (dict(n_layers=24, n_heads=16, d_model=1024, vocab_size=50304, seq=1024, batch=16), 183_000),
    "1.3b": (dict(n_layers=24, n_heads=16, d_model=2048, vocab_size=50304, seq=1024, batch=8), 58_600),
}
NANOGPT_MATMUL_PEAK = 825e12  # bf16 TFLOP/s measured on the H100 nanoGPT's MFU refers to


def model_config(shape: dict, toggles: dict, **extra) -> pl.ModelConfig:
    t = dict(toggles)
    n_kv = shape["n_heads"] if t.pop("kv") == "mha" else 1
    d = shape["d_model"]
    # SwiGLU's third matrix: PaLM keeps d_ff = 4d (more parameters); we do the same.
    return pl.ModelConfig(vocab_size=shape["vocab_size"], d_model=d, n_layers=shape["n_layers"],
                          n_heads=shape["n_heads"], n_kv_heads=n_kv, d_ff=4 * d,
                          max_seq_len=shape["seq"], **t, **extra)


def bench(cfg: pl.ModelConfig, batch: int, seq: int, repeats: int, precision: str = "float32") -> float:
    """Median tokens/s of the compiled train step (the same one ``train()`` runs)."""
    tc = TrainConfig(batch_size=batch, seq_len=seq, steps=1000, tokenizer="bytes", precision=precision)
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


def matmul_peak(n: int = 8192, repeats: int = 10) -> float:
    """The bf16 matmul rate this device reaches on an n³ product of random matrices."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in range(2))
    f = jax.jit(jnp.dot)
    return 2 * n**3 / median_seconds(lambda: f(a, b), repeats)


def cpu_suite(args) -> None:
    print(f"device: {jax.devices()[0].device_kind}, float32, median of {args.repeats} steps")
    header = f"{'shape':<6}{'toggles':<8}{'params':>12}{'tokens/s':>12}{'nanoGPT':>10}{'target':>10}"
    print(header + "\n" + "-" * len(header))
    for name, (shape, ref, target) in CPU_SHAPES.items():
        for label, toggles in (("gpt2", GPT2), ("palm", PALM)):
            cfg = model_config(shape, toggles)
            tps = bench(cfg, shape["batch"], shape["seq"], args.repeats)
            ref_s, target_s = (ref, target) if label == "gpt2" else ("-", "-")
            print(f"{name:<6}{label:<8}{pl.count_params(cfg):>12,}{tps:>12,.0f}"
                  f"{ref_s:>10}{target_s:>10}", flush=True)


def gpu_suite(args) -> None:
    kind = jax.devices()[0].device_kind
    peak = matmul_peak()
    datasheet = pl.accounting.device_peak_flops(kind)
    sheet = f"{datasheet / 1e12:.0f}" if datasheet else "unknown"
    print(f"device: {kind}; bf16 matmul measured {peak / 1e12:.0f} TFLOP/s (datasheet {sheet}); "
          f"median of {args.repeats} steps", flush=True)
    header = (f"{'shape':<6}{'toggles':<8}{'attn':<6}{'remat':<6}{'batch':>6}{'params':>15}"
              f"{'tokens/s':>11}{'MFU':>7}{'MFU825':>8}{'nanoGPT':>9}")
    print(header + "\n" + "-" * len(header), flush=True)
    for name in args.only:
        shape, ref = GPU_SHAPES[name]
        batch = args.batch or shape["batch"]
        for label in args.toggles:
            for attention in args.attention:
                for remat in args.remat:
                    cfg = model_config(shape, GPT2 if label == "gpt2" else PALM, dtype="bfloat16",
                                       attention_impl=attention, remat=remat)
                    try:
                        tps = bench(cfg, batch, shape["seq"], args.repeats, precision="bf16")
                    except Exception as e:  # noqa: BLE001 - report the row, go on with the others
                        print(f"{name:<6}{label:<8}{attention:<6}{remat:<6}{batch:>6} failed: "
                              f"{type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    flops = tps * pl.flops_per_token(cfg, shape["seq"])
                    mfu = f"{flops / datasheet:.1%}" if datasheet else "-"
                    print(f"{name:<6}{label:<8}{attention:<6}{remat:<6}{batch:>6}"
                          f"{pl.count_params(cfg):>15,}{tps:>11,.0f}{mfu:>7}"
                          f"{flops / NANOGPT_MATMUL_PEAK:>8.1%}{ref if label == 'gpt2' else '-':>9}",
                          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--only", nargs="+", default=list(GPU_SHAPES), choices=list(GPU_SHAPES),
                        help="gpu suite: shapes to run")
    parser.add_argument("--toggles", nargs="+", default=["gpt2", "palm"], choices=["gpt2", "palm"])
    parser.add_argument("--attention", nargs="+", default=["cudnn"], choices=pl.config.ATTENTION_IMPLS)
    parser.add_argument("--remat", nargs="+", default=["none"], choices=pl.config.REMATS)
    parser.add_argument("--batch", type=int, default=None, help="gpu suite: override the batch")
    args = parser.parse_args()
    cpu_suite(args) if args.suite == "cpu" else gpu_suite(args)


if __name__ == "__main__":
    main()
