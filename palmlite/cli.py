"""The ``palmlite`` command line: ``palmlite presets`` (more subcommands join with later issues)."""

from __future__ import annotations

import argparse
import sys

from palmlite import presets
from palmlite.accounting import count_params, flops_per_token, kv_cache_bytes_per_token


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def presets_table() -> str:
    """One row per preset: shape, parameters, training FLOPs per token, KV-cache bytes."""
    header = ("preset", "layers", "d_model", "heads", "kv", "head", "d_ff", "params",
              "FLOPs/token", "KV bytes/token")
    rows = [header]
    for name in presets.names():
        cfg = presets.get(name)
        rows.append((name, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size,
                     cfg.d_ff, _human(count_params(cfg)), _human(flops_per_token(cfg)),
                     _human(kv_cache_bytes_per_token(cfg, "bfloat16"), "B")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in
                       enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    note = ("FLOPs/token: training (6N + 12·L·H·Q·T, PaLM App. B) at each preset's max_seq_len; "
            "KV bytes/token: bf16 K and V over all layers.")
    return "\n".join(lines + ["", note])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="palmlite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("presets", help="table of every preset: params, FLOPs/token, KV-cache bytes")
    args = parser.parse_args(argv)
    if args.command == "presets":
        print(presets_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
