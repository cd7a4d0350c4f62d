"""RETRO's retrieval side (Borgeaud et al. 2021): the chunk database, its keys, the search,
and every training chunk's neighbours computed once.

RETRO (§2.2–2.3) cuts the training text into chunks of M = 64 tokens. The database is a
key-value memory: a value is a chunk N and its continuation F, the next M tokens of the
same text (R = 2M tokens); a key is a frozen BERT's embedding of N averaged over time.
Each chunk of a training sequence gets the J nearest keys by squared L2 distance (SCaNN in
the paper). The neighbours of the training data are computed once, before training, and
any neighbour from the same document as the training sequence is removed (§2.3): else the
model would be handed the text it must predict.

    corpus = load_corpus("pystdlib")
    train = TokenDataset(corpus, get_tokenizer("bpe:8192", corpus), split="train")
    db = ChunkDatabase(train, chunk_size=64)                 # the training split, in chunks
    retriever = Retriever(db, "bm25")       # or Retriever(db, "model:RUN_DIR", "ivfpq:256:16")
    nbrs = precompute_neighbours(retriever, train, k=2, seq_len=512)   # cached on disk

What palmlite does the same way, and what differently:

- ``ChunkDatabase``: the training split's flat token array (documents joined by EOS) cut
  into consecutive M-token chunks; ``fraction`` keeps the chunks of a seeded share of the
  documents, for RETRO's "gain against database size" (Table 14, there 2B to 1.75T tokens).
- Keys, named by a spec: ``"bm25"``, BM25 over token ids (exact, by ``bm25s``), which later
  work (Norlund et al. 2023; Doostmohammadi et al. 2023) found as good as dense keys or
  better; or ``"model:RUN_DIR"``, the frozen final hidden states of a trained palmlite run
  averaged over the chunk: the paper's frozen BERT, replaced by our own model (no download).
- Dense keys are searched by faiss: ``"flat"`` is exact squared L2, ``"ivfpq:NLIST:M"`` an
  inverted file with product quantization, approximate, for databases far beyond 10^5 chunks.
- ``precompute_neighbours``: every chunk of a split gets its J neighbours, excluding (for the
  training split) every database chunk whose text or continuation touches a document of
  the query's whole training window, so a neighbour is never a later part of the sequence.

What a run does with the neighbours is elsewhere: ``palmlite.retro_data`` attaches their
values to batches and evaluation windows (``NeighbourBatches``, ``for_training``), and
``palmlite.evaluate`` measures leakage (``chunk_overlap``, RETRO §2.6).

Shapes are in the names: Q queries, M chunk size, N database chunks, D key width, V
vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
import time
from pathlib import Path

import numpy as np

from palmlite.files import atomic_path, atomic_write_text, cache_dir, sha256_file
from palmlite.search import (BM25Index, FaissIndex, _fingerprint, _positive_int,
                             parse_index_spec)

__all__ = ["ChunkDatabase", "BM25Embedder", "ModelEmbedder", "make_embedder", "BM25Index",
           "FaissIndex", "parse_index_spec", "Retriever", "precompute_neighbours"]
FORMAT_VERSION = 1


# ---- the database ----------------------------------------------------------------------
class ChunkDatabase:
    """The chunks of one split (``dataset``, normally the training split): database id i is
    the flat chunk ``flat_ids[i]``, tokens ``flat_ids[i]*M .. flat_ids[i]*M + M - 1``.

    Documents are numbered by the EOS tokens of the flat array (an EOS belongs to the
    document it ends). ``first_doc``/``last_doc`` are the first and last document a chunk
    touches, ``continuation_last_doc`` the last one its continuation touches. With
    ``fraction`` < 1 only the chunks lying wholly in a seeded ``fraction`` of the documents
    are kept (a fraction of documents, not of tokens); values still read the flat array.
    """

    def __init__(self, dataset, chunk_size: int, fraction: float = 1.0, seed: int = 0):
        m = self.chunk_size = _positive_int("chunk_size", chunk_size)
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or \
                not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction={fraction!r} is invalid: expected a number in (0, 1]")
        self.dataset, self.fraction, self.seed = dataset, float(fraction), int(seed)
        self.tokens, self.eos_id = dataset.tokens, int(dataset.tokenizer.eos_id)
        n_flat = len(self.tokens) // m
        if n_flat < 1:
            raise ValueError(f"the {dataset.split} split has {len(self.tokens)} tokens: too few "
                             f"for one chunk of chunk_size={m}")
        self.eos_positions = np.flatnonzero(np.asarray(self.tokens) == self.eos_id)
        self.n_documents = len(self.eos_positions) + int(self.tokens[-1] != self.eos_id)
        starts = np.arange(n_flat, dtype=np.int64) * m
        first, last = self.document_of(starts), self.document_of(starts + m - 1)
        self.kept_documents = self._kept_documents()
        kept_cum = np.concatenate([[0], np.cumsum(np.isin(np.arange(self.n_documents),
                                                          self.kept_documents))])
        whole = kept_cum[last + 1] - kept_cum[first] == last - first + 1
        self.flat_ids = np.flatnonzero(whole).astype(np.int64)
        if not self.flat_ids.size:
            raise ValueError(f"fraction={fraction} keeps no whole chunk of chunk_size={m}: "
                             "raise the fraction")
        self.first_doc, self.last_doc = first[self.flat_ids], last[self.flat_ids]
        ends = np.minimum(starts[self.flat_ids] + 2 * m - 1, len(self.tokens) - 1)
        self.continuation_last_doc = self.document_of(ends)
        self.fingerprint = _fingerprint(dataset=dataset.meta, chunk_size=m,
                                        fraction=self.fraction, seed=self.seed)

    def _kept_documents(self) -> np.ndarray:
        if self.fraction == 1.0:
            return np.arange(self.n_documents)
        n_keep = max(1, round(self.fraction * self.n_documents))
        order = np.random.default_rng([self.seed, self.n_documents]).permutation(self.n_documents)
        return np.sort(order[:n_keep])

    def document_of(self, positions) -> np.ndarray:
        """The document (0, 1, ...) of flat token ``positions``: the EOS tokens before them."""
        return np.searchsorted(self.eos_positions, np.asarray(positions), side="left")

    def __len__(self) -> int:
        return int(self.flat_ids.size)

    def __repr__(self) -> str:
        return (f"ChunkDatabase({len(self):,} chunks of {self.chunk_size} tokens from "
                f"{self.dataset.corpus.name!r} ({self.dataset.split}), fraction {self.fraction})")

    def values(self, db_ids, length: int) -> np.ndarray:
        """int32 [..., length]: each chunk and what follows it in the flat array (length 2M:
        the chunk and its continuation, RETRO's values; M: the chunk alone), EOS past the end."""
        length = _positive_int("length", length)
        ids = np.asarray(db_ids)
        if ids.dtype.kind not in "iu" or (ids.size and (ids.min() < 0 or ids.max() >= len(self))):
            raise ValueError(f"db_ids must be integer database ids in [0, {len(self)}), got "
                             f"{ids.dtype} values in [{ids.min() if ids.size else '-'}, "
                             f"{ids.max() if ids.size else '-'}]")
        idx = self.flat_ids[ids][..., None] * self.chunk_size + np.arange(length)
        n = len(self.tokens)
        out = np.asarray(self.tokens[np.minimum(idx, n - 1).ravel()]).reshape(idx.shape)
        return np.where(idx < n, out, self.eos_id).astype(np.int32)

    def chunks(self, db_ids) -> np.ndarray:
        """int32 [..., M]: the chunks themselves (what the keys are computed from)."""
        return self.values(db_ids, self.chunk_size)

    def excluded_range(self, first_doc_Q, last_doc_Q) -> tuple[np.ndarray, np.ndarray]:
        """(lo_Q, hi_Q): database ids lo <= i < hi are those whose documents or continuation's
        documents meet [first_doc, last_doc]. Ids are in text order, so both document bounds
        grow with the id and the excluded ids of a query are one contiguous range."""
        first, last = np.asarray(first_doc_Q), np.asarray(last_doc_Q)
        if first.shape != last.shape or first.ndim != 1 or (first > last).any():
            raise ValueError("exclude must be a pair of 1-d arrays (first_doc_Q, last_doc_Q) of "
                             "one shape with first_doc <= last_doc")
        lo = np.searchsorted(self.continuation_last_doc, first, side="left")
        hi = np.searchsorted(self.first_doc, last, side="right")
        return lo, np.maximum(lo, hi)


# ---- keys ------------------------------------------------------------------------------
class BM25Embedder:
    """BM25 over token ids (each id a word): Lucene's variant with bm25s's defaults
    (k1 = 1.5, b = 0.75; every chunk has M tokens, so b has no effect). Exact search."""

    name = "bm25"

    def __init__(self, k1: float = 1.5, b: float = 0.75):
        import bm25s
        self.k1, self.b = k1, b
        self.fingerprint = _fingerprint(kind="bm25", method="lucene", k1=k1, b=b,
                                        bm25s=bm25s.__version__.split(".")[0])

    @staticmethod
    def check_index_spec(index_spec: str) -> None:
        if index_spec != "flat":
            raise ValueError(f"index_spec={index_spec!r} is invalid with BM25 keys: BM25 search "
                             "is exact (bm25s); use 'flat', or dense keys ('model:RUN_DIR') for "
                             "faiss indexes")

    def build(self, chunks_NxM: np.ndarray, vocab_size: int, index_spec: str = "flat"):
        self.check_index_spec(index_spec)
        return BM25Index(chunks_NxM, vocab_size, self.k1, self.b)


class ModelEmbedder:
    """Keys from a frozen trained palmlite run: ``Transformer.hidden_states`` (the final
    norm's output) averaged over the chunk's M tokens, float32 [N, D].

    RETRO's keys come from a frozen, separately pre-trained BERT (§2.3). None can be
    downloaded here, so a language model we trained ourselves stands in: frozen, never
    updated by the RETRO run, and reading the same token ids (its tokenizer must be the
    dataset's).
    """

    def __init__(self, run_dir: str | Path, dataset, batch_size: int = 256):
        from palmlite.train import load_run  # lazily: train imports the model side of RETRO
        self.run_dir = Path(run_dir)
        model, tokenizer, _ = load_run(self.run_dir)
        theirs = dataset.tokenizer
        if tokenizer.fingerprint != theirs.fingerprint:
            raise ValueError(
                f"the run {str(self.run_dir)!r} uses tokenizer {tokenizer.name!r} (fingerprint "
                f"{tokenizer.fingerprint[:12]}) but the database's dataset uses {theirs.name!r} "
                f"(fingerprint {theirs.fingerprint[:12]}): keys must be computed from the same "
                "token ids; use a run trained with the dataset's tokenizer")
        self.model, self.batch_size, self.eos_id = model, batch_size, int(theirs.eos_id)
        self.name = f"model:{self.run_dir}"
        self.fingerprint = _fingerprint(kind="model", params=self._params_digest())
        self._forward = None

    def _params_digest(self) -> str:
        import jax
        from flax import nnx
        digest = hashlib.sha256()
        for leaf in jax.tree.leaves(nnx.state(self.model)):
            digest.update(np.asarray(leaf).tobytes())
        return digest.hexdigest()

    def embed(self, chunks_QxM: np.ndarray) -> np.ndarray:
        """float32 [Q, D]: the mean hidden state of each chunk (one jitted forward per batch
        of ``batch_size`` chunks; the last batch is padded, so one shape compiles)."""
        import jax
        from flax import nnx
        if self._forward is None:
            graphdef, state = nnx.split(self.model)
            mean_hidden = lambda state, x: nnx.merge(graphdef, state).hidden_states(x).mean(1)
            self._state, self._forward = state, jax.jit(mean_hidden)
        chunks = np.asarray(chunks_QxM, dtype=np.int32)
        B, out = min(self.batch_size, len(chunks)), []
        for i in range(0, len(chunks), B):
            x = chunks[i:i + B]
            padded = np.pad(x, ((0, B - len(x)), (0, 0)), constant_values=self.eos_id)
            out.append(np.asarray(self._forward(self._state, padded))[:len(x)])
        return np.concatenate(out).astype(np.float32) if out else \
            np.zeros((0, self.model.cfg.d_model), np.float32)


def make_embedder(spec: str, dataset):
    """``"bm25"`` -> BM25Embedder; ``"model:RUN_DIR"`` -> ModelEmbedder (checked against
    ``dataset``'s tokenizer)."""
    if spec == "bm25":
        return BM25Embedder()
    if isinstance(spec, str) and spec.startswith("model:") and len(spec) > len("model:"):
        return ModelEmbedder(spec[len("model:"):], dataset)
    raise ValueError(f"embedder_spec={spec!r} is invalid: expected 'bm25' or 'model:RUN_DIR' "
                     "(a trained palmlite run directory)")


class Retriever:
    """A database, its keys and their index: ``search(chunks, k, exclude)`` -> database ids.

    ``embedder_spec``: "bm25" | "model:RUN_DIR"; ``index_spec``: "flat" | "ivfpq:NLIST:M"
    (dense keys only). ``fingerprint`` names the three together; ``seconds`` says how long
    the keys and the index took to build.
    """

    def __init__(self, db: ChunkDatabase, embedder_spec: str = "bm25", index_spec: str = "flat"):
        parse_index_spec(index_spec)  # a malformed spec fails before any keys are computed
        if embedder_spec == "bm25":
            BM25Embedder.check_index_spec(index_spec)
        self.db, self.index_spec = db, index_spec
        start = time.perf_counter()
        self.embedder = make_embedder(embedder_spec, db.dataset)
        chunks_NxM = db.chunks(np.arange(len(db)))
        if isinstance(self.embedder, BM25Embedder):  # its keys: BM25's sparse weights
            self.index = self.embedder.build(chunks_NxM, db.dataset.tokenizer.vocab_size)
            self.seconds = dict(keys=time.perf_counter() - start, index=0.0)
        else:
            keys_NxD = self.embedder.embed(chunks_NxM)
            middle = time.perf_counter()
            self.index = FaissIndex(keys_NxD, index_spec, embed=self.embedder.embed)
            self.seconds = dict(keys=middle - start, index=time.perf_counter() - middle)

    @property
    def fingerprint(self) -> str:
        return _fingerprint(db=self.db.fingerprint, embedder=self.embedder.fingerprint,
                            index=self.index.fingerprint)

    def __repr__(self) -> str:
        return f"Retriever({self.db!r}, {self.embedder.name!r}, {self.index_spec!r})"

    def search(self, query_chunks_QxM, k: int, exclude=None) -> np.ndarray:
        """int64 [Q, k]: the database ids of each query chunk's k nearest, nearest first.
        ``exclude`` = (first_doc_Q, last_doc_Q): skip database chunks whose documents, or
        their continuation's, meet that range (RETRO §2.3: never the training sequence's own)."""
        queries, lo, hi = self._check_query(query_chunks_QxM, k, exclude)
        return self.index.search(queries, k, lo, hi)

    def _check_query(self, query_chunks_QxM, k, exclude):
        k, m = _positive_int("k", k), self.db.chunk_size
        queries = np.asarray(query_chunks_QxM)
        if queries.ndim != 2 or queries.shape[1] != m or queries.dtype.kind not in "iu":
            raise ValueError(f"query_chunks_QxM must be integer token ids of shape [Q, {m}], got "
                             f"{queries.dtype} {queries.shape}")
        if exclude is None:
            lo = hi = np.zeros(len(queries), np.int64)
        else:
            lo, hi = self.db.excluded_range(*exclude)
            if lo.shape != (len(queries),):
                raise ValueError(f"exclude must hold one document range per query ({len(queries)}),"
                                 f" got {lo.shape}")
        left = len(self.db) - (hi - lo)
        if left.size and left.min() < k:
            raise ValueError(f"the database cannot supply k={k} neighbours: {len(self.db):,} "
                             f"chunks, of which only {int(left.min()):,} are outside the excluded "
                             "documents of some query; lower k or use a larger database")
        return queries, lo, hi


# ---- every chunk's neighbours, cached ------------------------------------------------
def precompute_neighbours(retriever: Retriever, dataset, k: int, seq_len: int,
                          exclude_same_documents: bool = True) -> np.memmap:
    """int32 [len(dataset) // M, k]: the database ids of the neighbours of every chunk c of
    ``dataset`` (tokens c*M .. c*M + M - 1), cached in ``cache_dir("retrieval")``.

    With ``exclude_same_documents`` (the training split, RETRO §2.3), chunk c's excluded
    documents are those of its whole training window c // (seq_len / M): windows start at
    multiples of seq_len, so no neighbour is ever a later part of the same sequence. The
    validation split shares no document with the training split: pass False.
    """
    db, m = retriever.db, retriever.db.chunk_size
    k, seq_len = _positive_int("k", k), _positive_int("seq_len", seq_len)
    if seq_len % m:
        raise ValueError(f"seq_len={seq_len} must be a multiple of the chunk size M={m}: "
                         "windows are cut into whole chunks")
    if dataset.tokenizer.fingerprint != db.dataset.tokenizer.fingerprint:
        raise ValueError(f"the dataset's tokenizer {dataset.tokenizer.name!r} is not the "
                         f"database's {db.dataset.tokenizer.name!r}")
    if exclude_same_documents and dataset.meta != db.dataset.meta:
        raise ValueError("exclude_same_documents=True compares document numbers of the "
                         f"database's own split ({db.dataset.split}); for another split "
                         f"({dataset.split}, whose documents the database lacks) pass False")
    if len(dataset) < m:
        raise ValueError(f"the {dataset.split} split has {len(dataset)} tokens: too few for one "
                         f"chunk of M={m}")
    meta = dict(format=FORMAT_VERSION, retriever=retriever.fingerprint, db=db.fingerprint,
                embedder=retriever.embedder.fingerprint, index=retriever.index_spec,
                dataset=dataset.meta, k=k, seq_len=seq_len,
                exclude_same_documents=bool(exclude_same_documents),
                shape=[len(dataset) // m, k])
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    name = re.sub(r"[^A-Za-z0-9_.:=,+-]", "_", dataset.corpus.name)[:40]
    path = cache_dir("retrieval") / f"{name}-{dataset.split}-{key}.bin"
    problem = _cache_problem(path, meta)
    if problem:
        print(f"retrieval: {problem}: computing the {k} neighbours of {meta['shape'][0]:,} "
              f"chunks of {dataset.corpus.name} ({dataset.split}) into {path}", flush=True)
        _build_neighbours(retriever, dataset, meta, path, exclude_same_documents)
    return np.memmap(path, dtype=np.int32, mode="r", shape=tuple(meta["shape"]))


def _cache_problem(path: Path, meta: dict) -> str | None:
    """Why the cached neighbours at ``path`` cannot be used, or None."""
    try:
        saved = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return "no cached neighbours"
    if not isinstance(saved, dict) or any(saved.get(f) != v for f, v in meta.items()):
        return "cached neighbours with other settings"
    if not path.exists() or path.stat().st_size != math.prod(meta["shape"]) * 4:
        return "cached neighbours of the wrong size (truncated?)"
    if saved.get("checksum") != sha256_file(path):
        return "cached neighbours damaged (checksum)"
    return None


def _build_neighbours(retriever, dataset, meta, path, exclude) -> None:
    from tqdm.auto import tqdm
    n, k = meta["shape"]
    path.with_suffix(".json").unlink(missing_ok=True)  # never pair new ids with old metadata
    block = 4096
    with atomic_path(path) as tmp:
        out = np.memmap(tmp, dtype=np.int32, mode="w+", shape=(n, k))  # n >= 1: checked
        with tqdm(total=n, desc="neighbours", unit="chunk", unit_scale=True, leave=False,
                  mininterval=1) as bar:
            for c0 in range(0, n, block):
                chunk_ids = np.arange(c0, min(n, c0 + block))
                out[chunk_ids] = _neighbours_of(retriever, dataset, chunk_ids, k, meta["seq_len"],
                                                exclude)
                bar.update(len(chunk_ids))
        out.flush()
        del out
    atomic_write_text(path.with_suffix(".json"), json.dumps(
        {**meta, "checksum": sha256_file(path), "corpus_name": dataset.corpus.name,
         "tokenizer_name": dataset.tokenizer.name, "embedder_name": retriever.embedder.name},
        indent=1))


def _neighbours_of(retriever, dataset, chunk_ids, k, seq_len, exclude) -> np.ndarray:
    """The neighbours of flat chunks ``chunk_ids`` of ``dataset``, excluding the documents of
    each chunk's training window; dense keys of the database's own chunks are reused."""
    db, m = retriever.db, retriever.db.chunk_size
    starts = chunk_ids * m
    queries = np.asarray(dataset.tokens[starts[:, None] + np.arange(m)], dtype=np.int32)
    ranges = None
    if exclude:  # the window's documents (dataset is db.dataset: checked by the caller)
        window = chunk_ids // (seq_len // m) * seq_len
        ranges = (db.document_of(window),
                  db.document_of(np.minimum(window + seq_len, len(dataset) - 1)))
    queries, lo, hi = retriever._check_query(queries, k, ranges)
    index = retriever.index
    if isinstance(index, FaissIndex) and dataset.meta == db.dataset.meta:
        pos = np.minimum(np.searchsorted(db.flat_ids, chunk_ids), len(db) - 1)
        known = db.flat_ids[pos] == chunk_ids
        keys = np.empty((len(chunk_ids), index.keys_NxD.shape[1]), np.float32)
        keys[known] = index.keys_NxD[pos[known]]
        if (~known).any():
            keys[~known] = index.embed(queries[~known])
        return index.search_keys(keys, k, lo, hi)
    return index.search(queries, k, lo, hi)
