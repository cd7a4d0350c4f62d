"""RETRO's retrieval on the Python standard library: how long each step takes.

    python benchmarks/retrieval.py [--chunk-size 64] [--k 2] [--seq-len 2048]
                                   [--model RUN_DIR [--index flat|ivfpq:NLIST:M]]

The training split of ``pystdlib`` tokenised with ``bpe:8192`` (cached as for training),
cut into chunks of 64 tokens (about 44k). One table, in seconds: the database, the keys
(BM25's sparse weights; with ``--model RUN_DIR`` also a frozen run's mean hidden states,
which needs a run trained with the same tokenizer, e.g. ``palmlite train --preset tiny
--steps 200 --out runs/tiny``), the exact index (faiss IndexFlatL2, dense keys only), and
every training chunk's k neighbours, outside its training window's documents, written to
a neighbour cache in a temporary directory (so nothing cached is reused). Target: the
BM25 row's total within 60 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

from palmlite.data import TokenDataset, get_tokenizer, load_corpus
from palmlite.retrieval import ChunkDatabase, Retriever, precompute_neighbours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--model", help="a run directory trained with bpe:8192 on pystdlib")
    parser.add_argument("--index", default="flat", help="the model keys' index: 'flat' (exact) "
                        "or 'ivfpq:NLIST:M'")
    args = parser.parse_args()
    corpus = load_corpus("pystdlib")
    train = TokenDataset(corpus, get_tokenizer("bpe:8192", corpus), split="train")
    start = time.perf_counter()
    db = ChunkDatabase(train, args.chunk_size)
    db_s = time.perf_counter() - start
    print(f"pystdlib train split: {len(train):,} tokens, {len(db):,} chunks of {args.chunk_size}; "
          f"k = {args.k}, seq_len = {args.seq_len}, threads: {os.cpu_count()}")
    header = (f"{'keys, index':<20}{'database':>10}{'keys':>8}{'index':>8}{'neighbours':>12}"
              f"{'total':>8}")
    print(header + "\n" + "-" * len(header))
    specs = ["bm25"] + ([f"model:{args.model}"] if args.model else [])
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PALMLITE_CACHE"] = tmp  # the neighbours are computed, never loaded
        for spec in specs:
            retriever = Retriever(db, spec, "flat" if spec == "bm25" else args.index)
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # its "computing ..." line
                precompute_neighbours(retriever, train, args.k, args.seq_len)
            nbr_s = time.perf_counter() - start
            keys_s, index_s = retriever.seconds["keys"], retriever.seconds["index"]
            index = "-" if spec == "bm25" else f"{index_s:.2f}"
            label = "bm25" if spec == "bm25" else f"model {args.index}"
            print(f"{label:<20}{db_s:>10.2f}{keys_s:>8.2f}{index:>8}{nbr_s:>12.2f}"
                  f"{db_s + keys_s + index_s + nbr_s:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
