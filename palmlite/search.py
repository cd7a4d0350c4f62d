"""Nearest-neighbour search over RETRO's database keys (``palmlite.retrieval`` builds the
keys and the database): exact BM25 scored a block of queries at a time, and faiss indexes
(``"flat"`` exact squared L2, ``"ivfpq:NLIST:M"`` an inverted file with product codes).
Both skip, per query, a range of database ids (the query's own documents, RETRO §2.3).

Shapes: Q queries, M chunk size, N database chunks, D key width, V vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np

MIN_POINTS_PER_CENTROID = 39  # faiss's k-means warns below this (ClusteringParameters)
PQ_CODES = 256  # 8-bit sub-quantizers: 256 centroids each
SCORE_BLOCK = 2**26  # BM25 scores computed for this many (query, chunk) pairs at a time (256 MB)


def _fingerprint(**fields) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected a positive integer")
    return int(value)


# ---- search ----------------------------------------------------------------------------
class BM25Index:
    """Exact BM25 top-k over the database chunks, for many queries at once.

    bm25s builds the index: a sparse V x N matrix of each token's BM25 weight in each chunk
    (idf · tf / (tf + k1 (1 - b + b L / L_avg))). A query's score for every chunk is the sum
    of the rows of its distinct tokens: the same scores as ``bm25s.BM25.retrieve``, but for a
    block of queries as one matrix product (bm25s scores one query at a time). The few
    tokens present in most chunks (indentation, newlines) go through a dense BLAS product,
    the rest through a sparse one. Ties go to the lower id.
    """

    def __init__(self, chunks_NxM: np.ndarray, vocab_size: int, k1: float = 1.5, b: float = 0.75,
                 dense_fraction: float = 1 / 32):
        import logging
        import bm25s
        import scipy.sparse as sp
        # bm25s sets its logger to DEBUG at import: each index build would print a line
        # ("Building index from IDs") into a notebook's stderr.
        logging.getLogger("bm25s").setLevel(logging.WARNING)
        chunks = np.asarray(chunks_NxM)
        self.n, self.vocab_size = len(chunks), int(vocab_size)
        self.bm25 = bm25s.BM25(k1=k1, b=b, method="lucene")
        vocab = {i: i for i in range(self.vocab_size)}  # token ids are bm25s's word ids
        self.bm25.index((chunks.tolist(), vocab), show_progress=False)
        s = self.bm25.scores  # CSC of N x V = CSR of V x N
        weights_VxN = sp.csr_matrix((s["data"], s["indices"], s["indptr"]),
                                    shape=(self.vocab_size, self.n))
        df_V = np.diff(weights_VxN.indptr)
        head = np.flatnonzero(df_V >= dense_fraction * self.n)
        self.column_V = np.full(self.vocab_size, -1)
        self.column_V[head] = np.arange(head.size)
        self.head_HxN = weights_VxN[head].toarray().astype(np.float32)
        tail = np.ones(self.vocab_size, np.float32)
        tail[head] = 0
        self.tail_VxN = sp.csr_matrix(sp.diags(tail) @ weights_VxN)
        self.tail_VxN.eliminate_zeros()
        self.fingerprint = "flat"

    def scores(self, query_chunks_QxM: np.ndarray) -> np.ndarray:
        """float32 [Q, N]: BM25 score of every database chunk for each query's distinct tokens."""
        import scipy.sparse as sp
        q = np.sort(np.asarray(query_chunks_QxM), axis=1)
        if q.size and (q.min() < 0 or q.max() >= self.vocab_size):
            raise ValueError(f"query token ids must be in [0, {self.vocab_size})")
        distinct = np.ones(q.shape, bool)
        distinct[:, 1:] = q[:, 1:] != q[:, :-1]
        rows, cols = np.nonzero(distinct)
        tokens = q[rows, cols]
        col = self.column_V[tokens]
        head = col >= 0
        dense_QxH = np.zeros((len(q), self.head_HxN.shape[0]), np.float32)
        dense_QxH[rows[head], col[head]] = 1.0
        tail_QxV = sp.csr_matrix((np.ones(int((~head).sum()), np.float32),
                                  (rows[~head], tokens[~head])), shape=(len(q), self.vocab_size))
        out_QxN = (tail_QxV @ self.tail_VxN).toarray()
        if dense_QxH.shape[1]:  # out += dense @ head, in place (BLAS's beta = 1)
            from scipy.linalg.blas import sgemm
            out_QxN = sgemm(1.0, self.head_HxN.T, dense_QxH.T, beta=1.0, c=out_QxN.T,
                            overwrite_c=True).T
        return np.ascontiguousarray(out_QxN, dtype=np.float32)

    def search(self, query_chunks_QxM: np.ndarray, k: int, lo_Q: np.ndarray,
               hi_Q: np.ndarray) -> np.ndarray:
        """int64 [Q, k]: highest scores first, skipping ids lo <= i < hi of each query."""
        block = max(1, SCORE_BLOCK // self.n)
        ids = [self._search_block(query_chunks_QxM[i:i + block], k, lo_Q[i:i + block],
                                  hi_Q[i:i + block])
               for i in range(0, len(query_chunks_QxM), block)]
        return np.concatenate(ids) if ids else np.zeros((0, k), np.int64)

    def _search_block(self, query_chunks_QxM, k, lo_Q, hi_Q) -> np.ndarray:
        scores_QxN = self.scores(query_chunks_QxM)
        for row, lo, hi in zip(scores_QxN, lo_Q, hi_Q):
            row[lo:hi] = -np.inf
        return top_k(scores_QxN, k)


def top_k(scores_QxN: np.ndarray, k: int) -> np.ndarray:
    """int64 [Q, k]: the columns of each row's k largest finite scores, largest first, ties
    by lower column (faiss's multi-threaded heaps: one pass, unlike np.argpartition)."""
    import faiss
    scores = np.ascontiguousarray(scores_QxN, dtype=np.float32)
    Q, n = scores.shape
    val_QxK, ids_QxK = np.empty((Q, k), np.float32), np.empty((Q, k), np.int64)
    heaps = faiss.float_minheap_array_t()  # a min-heap keeps the k largest
    heaps.k, heaps.nh = k, Q
    heaps.val, heaps.ids = faiss.swig_ptr(val_QxK), faiss.swig_ptr(ids_QxK)
    heaps.heapify()
    heaps.addn(n, faiss.swig_ptr(scores))
    heaps.reorder()
    if (ids_QxK < 0).any() or not np.isfinite(val_QxK).all():
        raise ValueError(f"fewer than k={k} candidates were left to choose from")
    order = np.lexsort((ids_QxK, -val_QxK), axis=-1)
    return np.take_along_axis(ids_QxK, order, axis=-1)


def parse_index_spec(spec: str) -> tuple[str, int, int]:
    """``"flat"`` -> ("flat", 0, 0); ``"ivfpq:NLIST:M"`` -> ("ivfpq", NLIST, M)."""
    if spec == "flat":
        return "flat", 0, 0
    match = re.fullmatch(r"ivfpq:(\d+):(\d+)", spec) if isinstance(spec, str) else None
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"index_spec={spec!r} is invalid: expected 'flat' (exact squared L2) "
                         "or 'ivfpq:NLIST:M' (faiss IndexIVFPQ: NLIST inverted lists, M "
                         "sub-quantizers of 8 bits; positive integers, M dividing the key width)")
    return "ivfpq", int(match[1]), int(match[2])


class FaissIndex:
    """Dense keys in a faiss index. ``"flat"``: IndexFlatL2, exact squared L2 (enough for
    ~10^5 chunks). ``"ivfpq:NLIST:M"``: IndexIVFPQ, the keys clustered into NLIST lists by a
    flat coarse quantizer and each compressed to M bytes; a search probes the ``nprobe``
    nearest lists, by default round(sqrt(NLIST)) (32 of 1024): about 1/sqrt(NLIST) of
    the database is scanned; raise ``index.nprobe`` for recall, lower it for speed.
    """

    def __init__(self, keys_NxD: np.ndarray, index_spec: str = "flat", embed=None, seed: int = 0):
        import faiss
        keys = np.ascontiguousarray(keys_NxD, dtype=np.float32)
        kind, nlist, m = parse_index_spec(index_spec)
        n, d = keys.shape
        self.spec, self.embed, self.keys_NxD = index_spec, embed, keys
        if kind == "flat":
            self.index = faiss.IndexFlatL2(d)
        else:
            _check_ivfpq(n, d, nlist, m)
            self.index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, nlist, m, 8)
            per_centroid = faiss.ClusteringParameters().max_points_per_centroid  # 256
            sample = min(n, per_centroid * max(nlist, PQ_CODES))  # what k-means would use
            rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
            self.index.train(keys[rows])
            self.index.nprobe = max(1, round(math.sqrt(nlist)))
        self.index.add(keys)
        self.seed = seed

    @property
    def fingerprint(self) -> str:  # nprobe may be changed after construction
        return _fingerprint(spec=self.spec, seed=self.seed, nprobe=getattr(self.index, "nprobe", 0))

    def search(self, query_chunks_QxM: np.ndarray, k: int, lo_Q, hi_Q) -> np.ndarray:
        return self.search_keys(self.embed(query_chunks_QxM), k, lo_Q, hi_Q)

    def search_keys(self, keys_QxD: np.ndarray, k: int, lo_Q, hi_Q) -> np.ndarray:
        """int64 [Q, k], nearest first, skipping ids lo <= i < hi: searches k + 2k deep, then
        the queries still short again, deeper (at least k + their excluded count)."""
        keys = np.ascontiguousarray(keys_QxD, dtype=np.float32)
        n, ids_QxK = self.index.ntotal, np.empty((len(keys), k), np.int64)
        pending, depth = np.arange(len(keys)), min(self.index.ntotal, 3 * k)
        nprobe = getattr(self.index, "nprobe", None)  # IVF: restored however this ends
        try:
            while pending.size:
                _, found = self.index.search(keys[pending], depth)
                lo, hi = lo_Q[pending, None], hi_Q[pending, None]
                bad = (found < 0) | ((found >= lo) & (found < hi))
                done = (~bad).sum(1) >= k
                first_k = np.argsort(bad[done], axis=1, kind="stable")[:, :k]
                ids_QxK[pending[done]] = np.take_along_axis(found[done], first_k, 1)
                pending = pending[~done]
                if pending.size and depth == n:  # IVF: the lists not probed hold the rest
                    if nprobe is None or self.index.nprobe == self.index.nlist:
                        raise ValueError(f"the database cannot supply k={k} neighbours")
                    self.index.nprobe = self.index.nlist
                depth = min(n, max(2 * depth, k + int((hi_Q - lo_Q)[pending].max(initial=0))))
        finally:
            if nprobe is not None:
                self.index.nprobe = nprobe
        return ids_QxK


def _check_ivfpq(n: int, d: int, nlist: int, m: int) -> None:
    need = MIN_POINTS_PER_CENTROID * max(nlist, PQ_CODES)
    if n < need:
        raise ValueError(
            f"index 'ivfpq:{nlist}:{m}' needs at least {need:,} training vectors, got {n:,}: "
            f"faiss's k-means wants {MIN_POINTS_PER_CENTROID} vectors per centroid, for the "
            f"{nlist} inverted lists and for each sub-quantizer's {PQ_CODES} codes. Fix: fewer "
            f"lists (NLIST <= {max(1, n // MIN_POINTS_PER_CENTROID)}), a larger database, or "
            "index_spec='flat' (exact)")
    if d % m:
        raise ValueError(f"index 'ivfpq:{nlist}:{m}' is invalid for keys of width {d}: M={m} "
                         f"sub-quantizers must divide it (e.g. M in "
                         f"{[x for x in (4, 8, 16, 32, 64) if d % x == 0]})")
