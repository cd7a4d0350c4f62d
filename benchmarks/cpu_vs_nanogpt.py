"""palmlite's jitted train step against a nanoGPT-style model in eager PyTorch, on the CPU.

    pip install -e '.[bench]'        # PyTorch (here: pip install torch==2.13.0, a CPU wheel)
    python benchmarks/cpu_vs_nanogpt.py [--shapes i,ii,iii,iv] [--repeats 20]
        [--steps-per-block 5] [--steps-per-call K] [--json out.json]

Both sides run in ONE process, float32, on the same batch, at the same shapes and (for
GPT-2's toggles) the same parameter count, both with AdamW and global-norm clipping at
1.0. The timing is interleaved: each repeat runs a block of torch steps, a block of
palmlite steps and a few matmuls (the order of the two models alternating between
repeats), so a load that drifts during the run hits both alike. Reported: the median over
repeats of each block's time per step, as tokens/s, and as model GFLOP/s (PaLM's
6N + 12·L·H·Q·T per token, ``palmlite.accounting.flops_per_token``, the same number for
both) next to the rate of one matmul measured in the same process.

Only meaningful on an idle machine: PyTorch's OpenMP threads (and XLA's pool) collapse
when other processes take the cores, and not by the same amount.

Shapes: (i) 2 layers x d_model 64 x T 128 x batch 16 x vocab 259 (bytes), 4 heads;
(ii) 4 x 128 x 128 x 16 x 259, 4 heads; (iii), (iv): shapes (a), (b) of train_step.py.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU comparison, even where a GPU exists

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    sys.exit("benchmarks/cpu_vs_nanogpt.py needs PyTorch: pip install -e '.[bench]' "
             "(on this machine: .venv/bin/pip install torch==2.13.0, the local CPU wheel; "
             "an unpinned torch downloads a CUDA build)")

import jax
import jax.numpy as jnp
import numpy as np

import palmlite as pl
from jax.sharding import NamedSharding, PartitionSpec as P
from palmlite import sharding
from palmlite.generate import median_seconds
from palmlite.train import init_state, make_train_step
from palmlite.train_config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under `python -m benchmarks....`
from train_step import CPU_SHAPES, GPT2, model_config  # noqa: E402

SHAPES = {
    "i": dict(n_layers=2, n_heads=4, d_model=64, vocab_size=259, seq=128, batch=16),
    "ii": dict(n_layers=4, n_heads=4, d_model=128, vocab_size=259, seq=128, batch=16),
    "iii": CPU_SHAPES["a"][0],
    "iv": CPU_SHAPES["b"][0],
}
IDLE_NOTE = ("NOTE: only meaningful on an idle machine: PyTorch's threads collapse when the "
             "machine is busy (and XLA's not by the same amount).")


# ---- the PyTorch side: nanoGPT's architecture, written from palmlite's config -----------------
# GPT-2 toggles on both sides (train_step.GPT2): LayerNorm, GELU MLP of 4d, serial pre-LN
# blocks, learned positions, MHA, tied embeddings, and biases everywhere (nanoGPT's
# bias=True: every Linear and LayerNorm, none on the tied lm head) -- so the parameter
# counts are equal. Differences that cost next to nothing: nanoGPT's exact-erf GELU vs
# palmlite's tanh one, LayerNorm eps, init, and palmlite's z-loss term (1e-4 log²Z).

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: pl.ModelConfig):
        super().__init__()
        D, b = cfg.d_model, cfg.use_bias
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(D, 3 * D, bias=b)  # q, k, v in one matmul, as nanoGPT's c_attn
        self.out = nn.Linear(D, D, bias=b)

    def forward(self, x_BxTxD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BxTxD.shape
        N = self.n_heads
        heads = lambda t: t.view(B, T, N, D // N).transpose(1, 2)  # -> B x N x T x H
        q_BxNxTxH, k_BxNxTxH, v_BxNxTxH = map(heads, self.qkv(x_BxTxD).split(D, dim=2))
        y_BxNxTxH = F.scaled_dot_product_attention(q_BxNxTxH, k_BxNxTxH, v_BxNxTxH, is_causal=True)
        return self.out(y_BxNxTxH.transpose(1, 2).reshape(B, T, D))


class TorchBlock(nn.Module):
    def __init__(self, cfg: pl.ModelConfig):
        super().__init__()
        D, b = cfg.d_model, cfg.use_bias
        self.ln_attn, self.ln_mlp = nn.LayerNorm(D, bias=b), nn.LayerNorm(D, bias=b)
        self.attn = CausalSelfAttention(cfg)
        self.up, self.down = nn.Linear(D, cfg.d_ff, bias=b), nn.Linear(cfg.d_ff, D, bias=b)

    def forward(self, x_BxTxD: torch.Tensor) -> torch.Tensor:
        x_BxTxD = x_BxTxD + self.attn(self.ln_attn(x_BxTxD))
        return x_BxTxD + self.down(F.gelu(self.up(self.ln_mlp(x_BxTxD))))


class TorchGPT(nn.Module):
    def __init__(self, cfg: pl.ModelConfig):
        super().__init__()
        ok = (cfg.norm, cfg.activation, cfg.block, cfg.position) == ("layernorm", "gelu", "serial", "learned")
        if not (ok and cfg.tie_embeddings and cfg.n_kv_heads == cfg.n_heads):
            raise ValueError("the PyTorch model exists only for GPT-2's toggles (train_step.GPT2)")
        self.tok_VxD = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_TxD = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(TorchBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model, bias=cfg.use_bias)
        for name, p in self.named_parameters():  # GPT-2's init: 0.02, residual outputs scaled
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                scaled = name.endswith(("attn.out.weight", "down.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers) if scaled else 0.02)

    def forward(self, x_BxT: torch.Tensor, y_BxT: torch.Tensor) -> torch.Tensor:
        pos_T = torch.arange(x_BxT.shape[1], device=x_BxT.device)
        h_BxTxD = self.tok_VxD(x_BxT) + self.pos_TxD(pos_T)
        for block in self.blocks:
            h_BxTxD = block(h_BxTxD)
        logits_BxTxV = self.ln_final(h_BxTxD) @ self.tok_VxD.weight.T  # tied lm head
        return F.cross_entropy(logits_BxTxV.flatten(0, 1), y_BxT.flatten())


class TorchRunner:
    """A TorchGPT with nanoGPT's AdamW (decay on matrices only) and clipping at 1.0."""

    def __init__(self, cfg: pl.ModelConfig, tc: TrainConfig, batch_BxT1: np.ndarray, adamw: str):
        torch.manual_seed(tc.seed)
        self.model = TorchGPT(cfg)
        params = list(self.model.parameters())  # a tied weight appears once
        groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=tc.weight_decay),
                  dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
        kind = dict(fused=dict(fused=True), foreach=dict(foreach=True), forloop=dict(foreach=False))
        self.opt = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), **kind[adamw])
        self.clip = tc.grad_clip
        tokens = torch.from_numpy(batch_BxT1).long()
        self.x_BxT, self.y_BxT = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        self.n_params = sum(p.numel() for p in params)

    def step(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(self.x_BxT, self.y_BxT)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return loss

    def block(self, n_steps: int) -> float:
        """Seconds per step over ``n_steps`` steps (eager on the CPU: synchronous)."""
        t0 = time.perf_counter()
        for _ in range(n_steps):
            loss = self.step()
        loss.item()
        return (time.perf_counter() - t0) / n_steps


# ---- the palmlite side: the step train() runs ---------------------------------------------------

def supports_steps_per_call() -> bool:
    return "steps_per_call" in inspect.signature(make_train_step).parameters


class PalmliteRunner:
    """palmlite's compiled train step; with K > 1 each call runs K steps on [K, B, T+1]."""

    def __init__(self, cfg: pl.ModelConfig, tc: TrainConfig, batch_BxT1: np.ndarray, k: int):
        mesh = None if tc.mesh is None else sharding.make_mesh(tc.mesh)
        graphdef, _, tx, self.state = init_state(cfg, tc, mesh=mesh)
        self.k = k
        shardings = () if mesh is None else (
            sharding.state_shardings(self.state, mesh),
            sharding.batch_sharding(mesh, batch_BxT1.shape))
        if k > 1:
            x = jnp.asarray(np.broadcast_to(batch_BxT1, (k, *batch_BxT1.shape)), jnp.int32)
            step = make_train_step(graphdef, tx, tc.z_loss, *shardings, steps_per_call=k)
            if mesh is not None:  # as train() places a block: each step's batch split
                x = jax.device_put(x, NamedSharding(mesh, P(None, *shardings[1].spec)))
        else:  # exactly what train() builds
            x = jnp.asarray(batch_BxT1, jnp.int32)
            step = make_train_step(graphdef, tx, tc.z_loss, *shardings)
            if mesh is not None:
                x = jax.device_put(x, shardings[1])
        self.x = x
        self.args = (x, jnp.int32(k)) if k > 1 else (x,)  # K > 1: every step of a call counts
        self.step = step.lower(self.state, *self.args).compile()

    def calls(self, n_calls: int) -> None:
        for _ in range(n_calls):
            self.state, m = self.step(self.state, *self.args)
        jax.block_until_ready(m)  # the loop dispatches ahead, as train() does

    def block(self, n_steps: int) -> float:
        """Seconds per step over ceil(n_steps / K) calls."""
        n_calls = -(-n_steps // self.k)
        t0 = time.perf_counter()
        self.calls(n_calls)
        return (time.perf_counter() - t0) / (n_calls * self.k)


# ---- matmul rates ---------------------------------------------------------------------------

class Matmul:
    """One float32 (m x k) @ (k x n) product, jitted JAX and torch, timed in the same process."""

    def __init__(self, m: int, k: int, n: int, calls: int = 5):
        self.flops, self.calls = 2.0 * m * k * n, calls
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        self.a_jax, self.b_jax = jnp.asarray(a), jnp.asarray(b)
        self.a_torch, self.b_torch = torch.from_numpy(a), torch.from_numpy(b)
        self.dot = jax.jit(jnp.dot)
        jax.block_until_ready(self.dot(self.a_jax, self.b_jax))  # compile
        torch.matmul(self.a_torch, self.b_torch)

    def rates(self) -> tuple[float, float]:
        """(JAX, torch) FLOP/s: the median of ``calls`` products each."""
        jax_s = median_seconds(lambda: self.dot(self.a_jax, self.b_jax), self.calls)
        torch_s = median_seconds(lambda: torch.matmul(self.a_torch, self.b_torch), self.calls)
        return self.flops / jax_s, self.flops / torch_s


# ---- one shape, interleaved ---------------------------------------------------------------------

def setup(name: str, args) -> tuple[pl.ModelConfig, TrainConfig, TorchRunner, PalmliteRunner, Matmul]:
    shape = SHAPES[name]
    B, T, D = shape["batch"], shape["seq"], shape["d_model"]
    cfg = model_config(shape, GPT2, attention_impl=args.attention)
    tc = TrainConfig(batch_size=B, seq_len=T, steps=1000, tokenizer="bytes", mesh=args.mesh)
    batch_BxT1 = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1), dtype=np.int32)
    torch_run = TorchRunner(cfg, tc, batch_BxT1, args.torch_adamw)
    palm_run = PalmliteRunner(cfg, tc, batch_BxT1, args.steps_per_call)
    for _ in range(args.warmup):  # warm both: allocator, thread pools, caches
        torch_run.step()
    palm_run.calls(args.warmup)
    # A representative matmul of the step: (B·T) x D by D x 4D, the MLP's up-projection.
    return cfg, tc, torch_run, palm_run, Matmul(B * T, D, 4 * D)


def interleave(torch_run, palm_run, matmul, args) -> dict:
    """Per repeat: a torch block and a palmlite block (order alternating) and the matmul."""
    t_torch, t_palm, mm_jax, mm_torch = [], [], [], []
    for r in range(args.repeats):
        blocks = [(torch_run, t_torch), (palm_run, t_palm)]
        for runner, times in blocks if r % 2 == 0 else blocks[::-1]:
            times.append(runner.block(args.steps_per_block))
        j, t = matmul.rates()
        mm_jax.append(j)
        mm_torch.append(t)
    return dict(s_torch=statistics.median(t_torch), s_palm=statistics.median(t_palm),
                paired_ratio=statistics.median(a / b for a, b in zip(t_torch, t_palm)),
                matmul_jax=statistics.median(mm_jax), matmul_torch=statistics.median(mm_torch))


def run_shape(name: str, args) -> dict:
    cfg, tc, torch_run, palm_run, matmul = setup(name, args)
    t = interleave(torch_run, palm_run, matmul, args)
    tokens = tc.batch_size * tc.seq_len
    fpt = pl.flops_per_token(cfg, tc.seq_len)
    tps_torch, tps_palm = tokens / t["s_torch"], tokens / t["s_palm"]
    s = SHAPES[name]
    return dict(shape=name, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model,
                seq=tc.seq_len, batch=tc.batch_size, vocab=cfg.vocab_size,
                params_torch=torch_run.n_params, params_palmlite=pl.count_params(cfg),
                flops_per_token=fpt, ms_torch=1e3 * t["s_torch"], ms_palmlite=1e3 * t["s_palm"],
                tokens_per_s_torch=tps_torch, tokens_per_s_palmlite=tps_palm,
                ratio=tps_palm / tps_torch, paired_ratio=t["paired_ratio"],
                gflops_torch=tps_torch * fpt / 1e9, gflops_palmlite=tps_palm * fpt / 1e9,
                matmul=f"{s['batch'] * s['seq']}x{s['d_model']}x{4 * s['d_model']}",
                matmul_gflops_jax=t["matmul_jax"] / 1e9, matmul_gflops_torch=t["matmul_torch"] / 1e9)


# ---- report -----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def header_info(args) -> dict:
    return dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                host=platform.node(), cpu=cpu_model(), jax_device=jax.devices()[0].device_kind,
                cpu_count=os.cpu_count(), usable_cores=len(os.sched_getaffinity(0)),
                load_average=os.getloadavg(), python=platform.python_version(),
                jax=jax.__version__, torch=torch.__version__, torch_threads=torch.get_num_threads(),
                torch_interop_threads=torch.get_num_interop_threads(),
                xla_flags=os.environ.get("XLA_FLAGS", ""), omp_num_threads=os.environ.get("OMP_NUM_THREADS", ""),
                repeats=args.repeats, steps_per_block=args.steps_per_block,
                steps_per_call=args.steps_per_call, torch_adamw=args.torch_adamw,
                attention=args.attention, mesh=args.mesh)


def print_header(info: dict, big: tuple[float, float]) -> None:
    print(f"{info['date']}  {info['host']}  CPU: {info['cpu']} ({info['usable_cores']} usable of "
          f"{info['cpu_count']} cores), load average {', '.join(f'{x:.2f}' for x in info['load_average'])}")
    print(f"jax {info['jax']} ({info['jax_device']}, XLA's own pool over the usable cores; "
          f"XLA_FLAGS={info['xla_flags']!r}); torch {info['torch']} ({info['torch_threads']} "
          f"intra-op / {info['torch_interop_threads']} inter-op threads, "
          f"OMP_NUM_THREADS={info['omp_num_threads']!r}); python {info['python']}")
    print(f"float32; median over {info['repeats']} interleaved repeats of blocks of "
          f"{info['steps_per_block']} steps; palmlite steps per call {info['steps_per_call']}, "
          f"attention {info['attention']}, mesh {info['mesh'] or 'none (one device)'}; "
          f"torch AdamW {info['torch_adamw']}")
    print(f"matmul 1024³ float32: jax {big[0] / 1e9:.1f} GFLOP/s, torch {big[1] / 1e9:.1f} GFLOP/s")
    print(IDLE_NOTE, flush=True)


COLUMNS = [  # title, key, alignment and width, value format
    ("shape", "shape", "<6", ""), ("params torch", "params_torch", ">13", ","),
    ("params palm", "params_palmlite", ">12", ","), ("tok/s torch", "tokens_per_s_torch", ">12", ",.0f"),
    ("tok/s palm", "tokens_per_s_palmlite", ">11", ",.0f"), ("palm/torch", "ratio", ">11", ".2f"),
    ("GF/s torch", "gflops_torch", ">11", ".1f"), ("GF/s palm", "gflops_palmlite", ">10", ".1f"),
    ("matmul", "matmul", ">15", ""), ("mm GF/s jax", "matmul_gflops_jax", ">12", ".1f"),
    ("mm GF/s torch", "matmul_gflops_torch", ">14", ".1f")]


def table_header() -> str:
    line = "".join(f"{title:{width}}" for title, _, width, _ in COLUMNS)
    return line + "\n" + "-" * len(line)


def table_row(row: dict) -> str:
    return "".join(f"{format(row[key], spec):{width}}" for _, key, width, spec in COLUMNS)


# ---- main -------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="i,ii,iii,iv", help="comma-separated, of " + ",".join(SHAPES))
    p.add_argument("--repeats", type=int, default=20, help="interleaved blocks per side")
    p.add_argument("--steps-per-block", type=int, default=TrainConfig.steps_per_call)
    p.add_argument("--steps-per-call", type=int, default=TrainConfig.steps_per_call,
                   help="palmlite only: optimizer steps per jitted call (lax.scan)")
    p.add_argument("--attention", choices=pl.config.ATTENTION_IMPLS,
                   default=pl.ModelConfig.attention_impl, help="palmlite's attention_impl")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side before timing")
    p.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                   help="palmlite on a device mesh, e.g. data=2 with XLA_FLAGS="
                        "--xla_force_host_platform_device_count=2: the CPU's cores as two "
                        "devices, half the batch each")
    # Measured on the 2-core EPYC (optimizer step alone): fused ≪ foreach < for-loop. nanoGPT
    # itself uses fused only on CUDA, i.e. the for-loop on a CPU: fused is the stronger baseline.
    p.add_argument("--torch-adamw", choices=["fused", "foreach", "forloop"], default="fused")
    p.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = p.parse_args()
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown or args.repeats < 1 or args.steps_per_block < 1 or args.steps_per_call < 1:
        p.error(f"shapes must be among {list(SHAPES)} (got {unknown}); counts must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.steps_per_call > 1 and not supports_steps_per_call():
        print(f"note: make_train_step has no steps_per_call argument yet; using 1 "
              f"instead of {args.steps_per_call}")
        args.steps_per_call = 1
    torch.set_num_threads(os.cpu_count())
    info = header_info(args)
    big = Matmul(1024, 1024, 1024).rates()
    print_header(info, big)
    print(table_header(), flush=True)
    rows = []
    for name in args.shapes:
        rows.append(run_shape(name, args))
        print(table_row(rows[-1]), flush=True)
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json is not None:
        info.update(matmul_1024_gflops_jax=big[0] / 1e9, matmul_1024_gflops_torch=big[1] / 1e9,
                    note=IDLE_NOTE, load_average_end=os.getloadavg())
        args.json.write_text(json.dumps(dict(info=info, rows=rows), indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
