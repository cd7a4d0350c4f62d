"""The palmlite command line: presets, train, launch, generate, sweep, figures."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from palmlite import presets
from palmlite.accounting import count_params, flops_per_token, kv_cache_bytes_per_token


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def presets_table() -> str:
    """One row per preset: shape, parameters (total and active), training FLOPs per token,
    KV-cache bytes; MoE presets also by GLaM's name, dense base size / experts."""
    header = ("preset", "layers", "d_model", "heads", "kv", "head", "d_ff", "B/E", "params",
              "active", "FLOPs/token", "KV bytes/token")
    rows = [header]
    for name in presets.names():
        cfg = presets.get(name)
        glam_name = "-" if cfg.moe is None else \
            f"{_human(count_params(cfg.replace(moe=None)))}/{cfg.moe.n_experts}E"
        rows.append((name, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size,
                     cfg.d_ff, glam_name, _human(count_params(cfg)),
                     _human(count_params(cfg, active=True)), _human(flops_per_token(cfg)),
                     _human(kv_cache_bytes_per_token(cfg, "bfloat16"), "B")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in
                       enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    note = ("FLOPs/token: training (6N + 12·L·H·Q·T, PaLM App. B, N active) at each preset's "
            "max_seq_len; KV bytes/token: bf16 K and V over all layers; B/E: GLaM's naming.")
    return "\n".join(lines + ["", note])


def _train(args) -> None:
    from palmlite.train import train
    from palmlite.train_config import TrainConfig, parse_overrides
    budget = dict(steps=args.steps) if args.tokens is None else dict(steps=None, tokens=args.tokens)
    tc = TrainConfig(corpus=args.corpus, tokenizer=args.tokenizer, quiet=args.quiet,
                     mesh=args.mesh, **budget)
    # One of several processes (`palmlite launch`, SLURM, a TPU pod)? Join the others before
    # JAX touches a device: sharding.initialize_distributed.
    from palmlite.sharding import initialize_distributed
    initialize_distributed()
    cfg, tc = parse_overrides(args.set, presets.get(args.preset), tc)
    result = train(cfg, tc, out=args.out, resume=args.resume)
    last = result.metrics[-1]
    import jax
    if jax.process_index() > 0:  # several processes: process 0 reports for all
        return
    print(f"step {last['step']}: loss {last['loss']:.4f}, val_loss {last.get('val_loss', float('nan')):.4f}, "
          f"val bits/byte {last.get('val_bits_per_byte', float('nan')):.4f}; run in {args.out}")


def _generate(args) -> None:
    from palmlite.generate import check_sampling, generate
    from palmlite.train import load_run
    check_sampling(args.temperature, args.top_k, args.top_p, args.seed)  # before the run loads
    model, tokenizer, info = load_run(args.run)
    retrieve = None
    if model.cfg.retro is not None:  # RETRO: the run's database, keys and index, rebuilt
        from palmlite.retro_data import RetroData
        retrieve = False if args.no_retrieval else RetroData.of_run(info).retrieve
    print(generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, retrieve=retrieve))


def _sweep(args) -> int:
    from palmlite.studies import run_study
    from palmlite.studies.runner import merge_study
    if args.merge:  # gathers every shard's rows: nothing to run, list or select
        given = [flag for flag, on in (("--shard", args.shard is not None), ("--only", args.only),
                                       ("--dry-run", args.dry_run)) if on]
        if given:
            raise ValueError(f"--merge gathers the rows of every shard and runs nothing: it "
                             f"takes --part and --out, not {', '.join(given)}")
        for path in merge_study(args.study, root=args.out, parts=args.part):
            print(f"  figure {path}")
        return 0
    return run_study(args.study, workers=args.workers, only=args.only, dry_run=args.dry_run,
                     root=args.out, parts=args.part, reuse_kernel=not args.fresh_kernels,
                     shard=args.shard)


def _figures(args) -> None:
    from palmlite.studies import draw_figures
    for path in draw_figures(args.study, root=args.out, parts=args.part):
        print(f"figure {path}")


def _resume_hint(args, argv: list[str] | None) -> str:
    """"; resume with: palmlite train ... --resume" after an interrupted run with a checkpoint."""
    if args.command != "train" or not (Path(args.out) / "checkpoints").is_dir():
        return ""
    words = [w for w in (sys.argv[1:] if argv is None else argv) if w != "--resume"]
    return "; resume with: palmlite " + " ".join(shlex.quote(w) for w in words + ["--resume"])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="palmlite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("presets", help="table of every preset: params, FLOPs/token, KV-cache bytes")
    _train_parsers(sub)
    _launch_parser(sub)
    _study_parsers(sub)
    return parser


def _train_parsers(sub) -> None:
    t = sub.add_parser("train", help="train a preset on a corpus; resumable run directory")
    t.add_argument("--preset", default="small", help=f"one of {presets.names()}")
    t.add_argument("--corpus", default="pystdlib", help="corpus name or path")
    t.add_argument("--tokenizer", default="bpe:8192", help='"bytes", "bpe:SIZE", "unigram:SIZE" or a .model')
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--tokens", type=int, default=None, help="token budget (instead of --steps)")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. model.block=serial or train.lr=3e-4")
    t.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                   help="shard over a device mesh, e.g. data=-1 or data=2,fsdp=2,tensor=2 "
                        "(axes data, fsdp, tensor, expert; -1 fills; default: one device)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--quiet", action="store_true", help="throttled progress (for sweeps)")
    g = sub.add_parser("generate", help="sample from a trained run")
    g.add_argument("--run", required=True, help="run directory written by `palmlite train`")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-retrieval", action="store_true",
                   help="a RETRO run generates without its database (CCA reads nothing)")


def _launch_parser(sub) -> None:
    n = sub.add_parser("launch", help="several local processes of one training run, joined "
                                      "into one JAX job (palmlite.launch)",
                       description="e.g. palmlite launch --processes 2 -- train --preset tiny "
                                   "--mesh data=-1 --out runs/two")
    n.add_argument("--processes", type=int, default=2, help="processes to start (default 2)")
    n.add_argument("--devices-per-process", type=int, default=4,
                   help="CPU devices each process gets (default 4)")
    n.add_argument("--log-dir", default=None, metavar="DIR",
                   help="where processes 1.. write their output (default: a new temporary "
                        "directory); process 0's is streamed")
    n.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop every process after this long (exit status 124)")
    n.add_argument("args", nargs=argparse.REMAINDER, metavar="-- train ...",
                   help="the palmlite command every process runs")


def _launch(args) -> int:
    from palmlite.launch import launch
    command = args.args[1:] if args.args[:1] == ["--"] else args.args
    return launch(command, args.processes, args.devices_per_process, log_dir=args.log_dir,
                  timeout=args.timeout)


def _study_parsers(sub) -> None:
    w = sub.add_parser("sweep", help="run a study's notebook over its grid with papermill")
    w.add_argument("study", help="a study spec, e.g. studies/quick.yaml")
    w.add_argument("--workers", type=int, default=1,
                   help="notebooks run at once (processes, each pinned to its share of the cores)")
    w.add_argument("--fresh-kernels", action="store_true",
                   help="a new kernel for every point (default: each worker reuses its kernel, "
                        "namespace emptied between points)")
    w.add_argument("--part", action="append", default=[], metavar="NAME",
                   help="run only this part of the study (repeatable)")
    w.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="run only the points whose parameter KEY equals VALUE")
    w.add_argument("--dry-run", action="store_true", help="list the points and what is done")
    w.add_argument("--shard", default=None, metavar="I/N",
                   help="run only machine I's share of the points, I from 0 to N-1 (e.g. "
                        "$SLURM_ARRAY_TASK_ID/8), each point's row in its own file; no figures")
    w.add_argument("--merge", action="store_true",
                   help="gather the rows the --shard runs wrote into the results file and "
                        "draw the figures (also done by every unsharded sweep and `figures`)")
    w.add_argument("--out", default=".", metavar="DIR",
                   help="where results, executed notebooks and figures go: DIR/studies/results, "
                        "DIR/studies/runs, DIR/figures (default: the working directory)")
    f = sub.add_parser("figures", help="redraw a study's figures from its results (no training)")
    f.add_argument("study", help="a study spec, e.g. studies/quick.yaml")
    f.add_argument("--part", action="append", default=[], metavar="NAME",
                   help="only this part's figures (repeatable)")
    f.add_argument("--out", default=".", metavar="DIR",
                   help="read DIR/studies/results, write DIR/figures (default: the working directory)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "presets":
            print(presets_table())
        elif args.command == "train":
            _train(args)
        elif args.command == "launch":
            return _launch(args)
        elif args.command == "sweep":
            return 1 if _sweep(args) else 0
        elif args.command == "figures":
            _figures(args)
        else:
            _generate(args)
    except BrokenPipeError:  # `palmlite presets | head`: the reader left, nothing to say
        sys.stderr.close()  # and no second error when Python flushes stdout at exit
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C: one line, and for a training run how to resume
        print(f"palmlite {args.command}: {e or 'interrupted'}" + _resume_hint(args, argv),
              file=sys.stderr)
        return 130
    # OSError: files and permissions; ImportError: an optional dependency, named with its pip
    # install in the message; FloatingPointError: the NaN guard.
    except (ValueError, OSError, FloatingPointError, ImportError) as e:
        print(f"palmlite {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
