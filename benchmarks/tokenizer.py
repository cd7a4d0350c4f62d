"""Tokenizer speed and compression on the Python standard library.

    python benchmarks/tokenizer.py [--vocab 8192] [--repeats 3] [--unigram]

Prints one table: the time to train a SentencePiece vocabulary on ``pystdlib`` (the cache
is bypassed), the time and tokens/s of ``encode_batch`` over all of it, and the bytes per
token (UTF-8 bytes / tokens; higher = shorter sequences) on ``pystdlib`` and on the English
prose of ``pydocs``, against the byte-level baseline. Times are medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from palmlite import tokenizer as tk
from palmlite.data import load_corpus


def median_seconds(fn, repeats: int):
    """(median seconds, last result) of ``repeats`` calls of ``fn()``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bytes_per_token(tok: tk.Tokenizer, documents) -> float:
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    return n_bytes / sum(map(len, tok.encode_batch(documents)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unigram", action="store_true", help="also unigram (about a minute a run)")
    args = parser.parse_args()
    code, prose = load_corpus("pystdlib"), load_corpus("pydocs")
    threads = os.cpu_count()
    print(f"pystdlib: {len(code.documents):,} files, {code.n_bytes / 1e6:.1f} MB   "
          f"pydocs: {prose.n_bytes / 1e6:.1f} MB   threads: {threads}   (median of {args.repeats})")
    header = (f"{'tokenizer':<24}{'train s':>9}{'encode s':>10}{'tokens/s':>12}"
              f"{'B/tok code':>12}{'B/tok prose':>13}")
    print(header + "\n" + "-" * len(header))

    def row(label, tok, train_s):
        encode_s, ids = median_seconds(lambda: tok.encode_batch(code.documents), args.repeats)
        n_tokens = sum(map(len, ids))
        train = "-" if train_s is None else f"{train_s:.1f}"
        print(f"{label:<24}{train:>9}{encode_s:>10.2f}{n_tokens / encode_s:>12,.0f}"
              f"{code.n_bytes / n_tokens:>12.3f}{bytes_per_token(tok, prose.documents):>13.3f}",
              flush=True)

    row("bytes", tk.ByteTokenizer(), None)
    variants = [("bpe", True), ("bpe", False)] + [("unigram", True)] * args.unigram
    with tempfile.TemporaryDirectory() as tmp:
        for model_type, split_digits in variants:
            out = Path(tmp) / f"{model_type}-{split_digits}.model"  # out=: never the cache
            train_s, tok = median_seconds(lambda: tk.train(
                code, args.vocab, model_type=model_type, split_digits=split_digits, out=out,
                num_threads=threads), args.repeats)
            row(f"{tok.name}{'' if split_digits else ' no-split'}", tok, train_s)


if __name__ == "__main__":
    main()
