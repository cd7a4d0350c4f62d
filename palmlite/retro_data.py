"""What a RETRO run reads (Borgeaud et al. 2021): training batches and evaluation windows
with each chunk's neighbour values, and a run's retrieval put together
(``palmlite.retrieval`` builds the database, its keys and the cached neighbours).

RETRO (§2.3) computes the neighbours of the training data once, before training; a batch
then reads the neighbour values of its chunks by chunk id, a lookup instead of a search.

    db = ChunkDatabase(train, chunk_size=64)                 # palmlite.retrieval
    nbrs = precompute_neighbours(Retriever(db, "bm25"), train, k=2, seq_len=512)
    batches = NeighbourBatches(train.batches(16, 512), nbrs, db, length=128)
    batch = batches.get(step)       # tokens B x (T+1), neighbours B x C x J x R

    data = for_training(cfg.retro, tc, train, valid)   # all of it, as a run's configs say
    batches, windows = data.batches(train.batches(16, 512)), data.windows(valid, 512)

- ``NeighbourBatches``: ``Batches`` with each chunk's neighbour values, a pure function of
  (seed, step) like the batches themselves; ``neighbour_windows``: the consecutive windows
  of an evaluation with theirs.
- ``for_training(retro, tc, train, valid)`` -> ``RetroData``: the database, retriever and
  neighbours of a RETRO run, as its RetroConfig and TrainConfig say; ``RetroData.of_run``
  rebuilds a trained run's, and ``RetroData.retrieve`` is what generation calls every M
  tokens.

Shapes are in the names: B batch, T sequence length, M chunk size, C = T / M chunks per
sequence, J neighbours, R neighbour length, N windows.
"""

from __future__ import annotations

import json
import time

import numpy as np

from palmlite.retrieval import ChunkDatabase, Retriever, precompute_neighbours
from palmlite.search import _positive_int

__all__ = ["NeighbourBatches", "neighbour_windows", "RetroData", "for_training"]


# ---- batches with neighbours ------------------------------------------------------------
class NeighbourBatches:
    """``Batches`` plus each chunk's neighbour values: ``get(step)`` -> dict(tokens=int32
    [B, T+1], exactly ``batches.get(step)``, neighbours=int32 [B, C, J, R]), C = T / M chunks,
    J = the neighbours' k, R = ``length``. A pure function of (seed, step)."""

    def __init__(self, batches, neighbours, db: ChunkDatabase, length: int):
        m = db.chunk_size
        self.batches, self.db, self.length = batches, db, _positive_int("length", length)
        if batches.seq_len % m:
            raise ValueError(f"batches.seq_len={batches.seq_len} must be a multiple of the "
                             f"chunk size M={m}")
        n_chunks = len(batches.dataset) // m
        if np.ndim(neighbours) != 2 or len(neighbours) != n_chunks:
            raise ValueError(f"neighbours must be [{n_chunks}, k] (one row per chunk of the "
                             "batches' dataset: precompute_neighbours), got "
                             f"{np.shape(neighbours)}")
        self.neighbours, self.chunks_per_window = neighbours, batches.seq_len // m

    dataset = property(lambda self: self.batches.dataset)
    batch_size = property(lambda self: self.batches.batch_size)
    seq_len = property(lambda self: self.batches.seq_len)

    def epoch(self, step: int) -> float:
        return self.batches.epoch(step)

    def get(self, step: int, rows: slice = slice(None)) -> dict:
        tokens_BxT1 = self.batches.get(step, rows)
        windows_B = self.batches.window_starts(step, rows) // self.batches.seq_len
        return dict(tokens=tokens_BxT1, neighbours=self._values(windows_B))

    def _values(self, windows_B: np.ndarray) -> np.ndarray:
        C = self.chunks_per_window
        chunk_ids_BxC = windows_B[:, None] * C + np.arange(C)
        ids_BxCxJ = np.asarray(self.neighbours[chunk_ids_BxC.ravel()]).reshape(
            *chunk_ids_BxC.shape, -1)
        return self.db.values(ids_BxCxJ, self.length)

    def __iter__(self):
        step = 0
        while True:
            yield self.get(step)
            step += 1


def neighbour_windows(dataset, neighbours, db: ChunkDatabase, seq_len: int, length: int,
                      max_windows: int | None = None) -> dict:
    """dict(tokens=[N, T+1], neighbours=[N, C, J, R]): ``dataset.windows(seq_len)`` (consecutive
    windows, for evaluation) and their chunks' neighbour values."""
    seq_len, m = _positive_int("seq_len", seq_len), db.chunk_size
    if seq_len % m:
        raise ValueError(f"seq_len={seq_len} must be a multiple of the chunk size M={m}")
    if np.ndim(neighbours) != 2 or len(neighbours) != len(dataset) // m:
        raise ValueError(f"neighbours must be [{len(dataset) // m}, k] (precompute_neighbours "
                         f"of this dataset), got {np.shape(neighbours)}")
    tokens = dataset.windows(seq_len, max_windows)
    C = seq_len // m
    chunk_ids_NxC = np.arange(len(tokens))[:, None] * C + np.arange(C)
    ids = np.asarray(neighbours[chunk_ids_NxC.ravel()]).reshape(len(tokens), C, -1)
    return dict(tokens=tokens, neighbours=db.values(ids, length))


# ---- a RETRO run's retrieval ------------------------------------------------------------------
class RetroData:
    """What a RETRO run retrieves with (``for_training``): the training split's database, its
    retriever, every training chunk's neighbours (same-document ones excluded), and
    ``windows``/``batches`` that attach neighbour values. ``seconds``: the time of each step."""

    def __init__(self, retro, tc, train_ds, val_ds):
        start = time.perf_counter()
        self.retro, self.seq_len, self.train_ds = retro, tc.seq_len, train_ds
        self.db = ChunkDatabase(train_ds, retro.chunk_size, tc.retrieval_db_fraction,
                                seed=tc.split_seed)
        database_s = time.perf_counter() - start
        self.retriever = Retriever(self.db, tc.retrieval, tc.retrieval_index)
        self.seconds = dict(database=database_s, **self.retriever.seconds)
        self._neighbours = {}  # computed (or read from the cache) when first asked for

    def neighbours(self, dataset, seq_len: int) -> np.memmap:
        """[len(dataset) // M, J] database ids (cached): the training split's with its
        windows' documents excluded, any other split's (validation) without exclusion."""
        own = dataset.meta == self.train_ds.meta
        key = (json.dumps(dataset.meta, sort_keys=True), seq_len if own else None)
        if key not in self._neighbours:
            start = time.perf_counter()
            self._neighbours[key] = precompute_neighbours(
                self.retriever, dataset, self.retro.n_neighbours, seq_len,
                exclude_same_documents=own)
            name = "train" if own else dataset.split
            self.seconds[f"{name} neighbours"] = time.perf_counter() - start
        return self._neighbours[key]

    def windows(self, dataset, seq_len: int, max_windows: int | None = None) -> dict:
        """``neighbour_windows`` of ``dataset`` (evaluation): tokens and neighbour values."""
        return neighbour_windows(dataset, self.neighbours(dataset, seq_len), self.db, seq_len,
                                 self.retro.neighbour_len, max_windows)

    def batches(self, batches) -> NeighbourBatches:
        return NeighbourBatches(batches, self.neighbours(batches.dataset, batches.seq_len),
                                self.db, self.retro.neighbour_len)

    def retrieve(self, chunks_BxM: np.ndarray) -> np.ndarray:
        """int32 [B, J, R]: the neighbour values of each chunk (no exclusion: a generated
        chunk has no document), what ``generate.retro_generate_tokens`` calls every M tokens."""
        ids_BxJ = self.retriever.search(np.asarray(chunks_BxM), self.retro.n_neighbours)
        return self.db.values(ids_BxJ, self.retro.neighbour_len).astype(np.int32)

    @classmethod
    def of_run(cls, info: dict) -> "RetroData":
        """The retrieval a run trained with, rebuilt from its config.json (``info``)."""
        from palmlite.config import ModelConfig
        from palmlite.train import datasets
        from palmlite.train_config import TrainConfig
        cfg, tc = ModelConfig.from_dict(info["model"]), TrainConfig.from_dict(info["train"])
        _, _, train_ds, val_ds = datasets(tc)
        return cls(cfg.retro, tc, train_ds, val_ds)

    def to_dict(self) -> dict:
        """For a run's config.json."""
        return dict(retriever=f"{self.retriever.embedder.name}, {self.retriever.index_spec}",
                    fingerprint=self.retriever.fingerprint, chunks=len(self.db),
                    chunk_size=self.db.chunk_size, fraction=self.db.fraction,
                    neighbours=self.retro.n_neighbours, neighbour_len=self.retro.neighbour_len,
                    seconds={k: round(v, 3) for k, v in self.seconds.items()})

    def __repr__(self) -> str:
        return f"RetroData({self.retriever!r}, {self.retro.n_neighbours} neighbours per chunk)"


def for_training(retro, tc, train_ds, val_ds) -> RetroData:
    """The retrieval of a RETRO run: ``retro`` (a RetroConfig: chunk size, neighbours,
    continuation) and ``tc`` (a TrainConfig: ``retrieval`` keys, ``retrieval_index``,
    ``retrieval_db_fraction``, ``seq_len``; the database's document subset is drawn with
    ``split_seed``, so every training seed reads the same database)."""
    return RetroData(retro, tc, train_ds, val_ds)
