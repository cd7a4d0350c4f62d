"""What retrieval costs a train step: RETRO against its baseline, paired and interleaved.

    python benchmarks/retro_step.py [--preset small-retro] [--repeats 30] [--rounds 5]

The RETRO model is the preset; the baseline is the same decoder without ``retro``. Both
compiled train steps (the ones ``train()`` runs, with the neighbours a RETRO batch carries:
B x C x J x R token ids) are timed in one process, alternating in rounds, and the table
gives median tokens/s of each, their ratio per round (median), and the model FLOPs per
token of each (``accounting.flops_per_token``). Issue #12's target: a RETRO step costs at
most 1.6x its baseline at the teaching preset. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from palmlite import presets
from palmlite.accounting import count_params, flops_per_token
from palmlite.train import init_state, make_train_step
from palmlite.train_config import TrainConfig


def compiled_step(cfg, tc):
    """(step, state, batch): one compiled train step, its state and a fixed random batch."""
    graphdef, _, tx, state = init_state(cfg, tc)
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (tc.batch_size, tc.seq_len + 1), 0, cfg.vocab_size)
    batch = tokens
    if cfg.retro is not None:
        r = cfg.retro
        shape = (tc.batch_size, tc.seq_len // r.chunk_size, r.n_neighbours, r.neighbour_len)
        batch = dict(tokens=tokens, neighbours=jax.random.randint(key, shape, 0, cfg.vocab_size))
    step = make_train_step(graphdef, tx, tc.z_loss).lower(state, batch).compile()
    for _ in range(3):  # warm up
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return step, state, batch


def time_steps(runner, repeats: int) -> tuple[float, dict]:
    """Median seconds of ``repeats`` steps; the runner's state advances."""
    step, state, batch = runner["step"], runner["state"], runner["batch"]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    runner["state"] = state
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small-retro")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048, help="the studies' bpe:2048")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    retro = presets.get(args.preset, vocab_size=args.vocab, max_seq_len=args.seq)
    models = {"baseline": retro.replace(retro=None), "RETRO": retro}
    tc = TrainConfig(batch_size=args.batch, seq_len=args.seq, steps=1000, tokenizer="bytes")
    runners = {}
    for name, cfg in models.items():
        step, state, batch = compiled_step(cfg, tc)
        runners[name] = dict(step=step, state=state, batch=batch)
    seconds = {name: [] for name in models}
    for _ in range(args.rounds):  # interleaved: both see the same machine state
        for name in models:
            seconds[name].append(time_steps(runners[name], args.repeats))
    tokens = args.batch * args.seq
    ratios = [r / b for r, b in zip(seconds["RETRO"], seconds["baseline"])]
    r = retro.retro
    print(f"{args.preset}: B {args.batch} x T {args.seq}, vocab {args.vocab}, chunk {r.chunk_size}, "
          f"{r.n_neighbours} neighbours of {r.neighbour_len} tokens, CCA layers "
          f"{r.layers(retro.n_layers)}, device {jax.devices()[0].device_kind}")
    print(f"{'model':>9} {'params':>9} {'MFLOP/token':>12} {'tokens/s':>10} {'ms/step':>8}")
    for name, cfg in models.items():
        s = statistics.median(seconds[name])
        print(f"{name:>9} {count_params(cfg):>9,} {flops_per_token(cfg, args.seq) / 1e6:>12.2f} "
              f"{tokens / s:>10,.0f} {1e3 * s:>8.1f}")
    print(f"RETRO step / baseline step: {statistics.median(ratios):.2f}x (median of "
          f"{args.rounds} interleaved rounds; per round: {', '.join(f'{x:.2f}' for x in ratios)}); "
          f"FLOPs ratio {flops_per_token(retro, args.seq) / flops_per_token(models['baseline'], args.seq):.2f}x")


if __name__ == "__main__":
    main()
