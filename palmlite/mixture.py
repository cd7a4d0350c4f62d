"""Mixtures of corpora: one model trained on many domains (Pathways' "one model, many tasks").

    corpus = load_corpus("mix:pystdlib=0.4,pydocs=0.3,arithmetic=0.3")   # a Mixture
    train = MixtureDataset(corpus, tokenizer, split="train")
    batch = train.batches(16, 128, seed=0).get(step)   # {"tokens": [B, T+1], "domains": [B]}

Each domain is its own ``TokenDataset`` (its own train/validation split by document, its
own bytes per token), and every sequence of a batch comes from one domain, whose id travels
with it: the metrics report each domain's loss, and a task-routed mixture of experts reads
it (``MoEConfig.routing``).

Which domain serves row g of the stream (g = step · B + row) is a pure function of (seed,
g): the Weyl sequence u_g = frac(u_0 + g·φ) (φ the golden ratio's fractional part) falls in
domain d's share [c_{d-1}, c_d) of the cumulative weights. It is stratified rather than
random: every batch holds each domain's share of the rows to within one or two rows, and
over n rows the shares are exact to O(log n / n), so no batch-to-batch sampling noise enters
a comparison of domains. Each domain serves its own windows in its own order, without
replacement, as ``Batches`` does; the row's index in its domain is the count of earlier
rows of that domain.
"""

from __future__ import annotations

import math

import numpy as np

from palmlite.corpora import Mixture
from palmlite.data import Batches, TokenDataset

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # the Weyl step: the most evenly spreading irrational


class MixtureDataset:
    """One split of every domain of a ``Mixture``, with the mixture's weights."""

    def __init__(self, corpus: Mixture, tokenizer, *, split: str = "train",
                 val_fraction: float = 0.05, seed: int = 0):
        self.corpus, self.tokenizer, self.split = corpus, tokenizer, split
        self.domains = tuple(TokenDataset(c, tokenizer, split=split, val_fraction=val_fraction,
                                          seed=seed) for c in corpus.components)
        self.names = corpus.domains
        self.weights = np.asarray(corpus.weights, np.float64)
        self.meta = dict(corpus=corpus.fingerprint, tokenizer=tokenizer.fingerprint, split=split,
                         val_fraction=val_fraction, seed=seed)

    def __len__(self) -> int:
        return sum(len(d) for d in self.domains)

    @property
    def n_bytes(self) -> int:
        return sum(d.n_bytes for d in self.domains)

    @property
    def bytes_per_token(self) -> float:
        """Expected UTF-8 bytes per token of a training sequence: Σ_d w_d · bytes/token_d
        (each sequence comes from domain d with probability w_d)."""
        return float(sum(w * d.bytes_per_token for w, d in zip(self.weights, self.domains)))

    def bits_per_byte(self, loss_nats_per_token: float) -> float:
        """The mixture's nats per token -> bits per byte: Σ w_d L_d / ln 2 / Σ w_d b_d."""
        return loss_nats_per_token / math.log(2) / self.bytes_per_token

    def to_dict(self) -> dict:
        return dict(**self.meta, n_tokens=len(self), n_bytes=self.n_bytes,
                    bytes_per_token=self.bytes_per_token, corpus_name=self.corpus.name,
                    tokenizer_name=self.tokenizer.name,
                    domains=[dict(d.to_dict(), weight=float(w))
                             for d, w in zip(self.domains, self.weights)])

    def batches(self, batch_size: int, seq_len: int, seed: int = 0) -> "MixtureBatches":
        return MixtureBatches(self, batch_size, seq_len, seed)

    def weighted(self, by_domain: dict[str, float]) -> float:
        """Σ_d w_d · value_d: the mixture's loss from its domains' losses."""
        return float(sum(w * by_domain[n] for n, w in zip(self.names, self.weights)))


class MixtureBatches:
    """``get(step)`` -> {"tokens": int32 [B, T+1], "domains": int32 [B]}, a pure function of
    (seed, step) like ``Batches.get``; ``rows`` selects one host's rows."""

    def __init__(self, dataset: MixtureDataset, batch_size: int, seq_len: int, seed: int = 0):
        self.dataset, self.batch_size, self.seq_len, self.seed = dataset, batch_size, seq_len, seed
        self.parts = [Batches(d, batch_size, seq_len, seed) for d in dataset.domains]
        self.bounds = np.cumsum(dataset.weights)[:-1]  # domain d: u in [c_{d-1}, c_d)
        self.offset = float(np.random.default_rng([seed, len(self.parts)]).random())
        self._served = (0, np.zeros(len(self.parts), np.int64))  # (rows n, per-domain counts)

    def domains_of(self, g: np.ndarray) -> np.ndarray:
        """The domain of each global row g (the Weyl sequence; see the module docstring)."""
        u = np.mod(self.offset + np.asarray(g, np.float64) * GOLDEN, 1.0)
        return np.searchsorted(self.bounds, u, side="right").astype(np.int32)

    def served_before(self, n: int) -> np.ndarray:
        """How many of the first n rows each domain served (kept for the next call, which
        is usually the next step: each step then costs O(B))."""
        start, counts = self._served
        if n < start:
            start, counts = 0, np.zeros_like(counts)
        counts = counts.copy()
        for lo in range(start, n, 1 << 22):  # bounded memory on a resume far into a run
            rows = self.domains_of(np.arange(lo, min(n, lo + (1 << 22))))
            counts += np.bincount(rows, minlength=len(counts))
        self._served = (n, counts)
        return counts

    def get(self, step: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        first = step * self.batch_size
        domains_B = self.domains_of(first + np.arange(self.batch_size))
        # Row r's index in its domain: that domain's rows before this batch, plus its rows
        # earlier in this batch.
        earlier_B = np.array([np.sum(domains_B[:r] == d) for r, d in enumerate(domains_B)])
        index_B = self.served_before(first)[domains_B] + earlier_B
        domains_b, index_b = domains_B[rows], index_B[rows]
        tokens_bxT1 = np.empty((len(domains_b), self.seq_len + 1), np.int32)
        for d, part in enumerate(self.parts):
            mine = domains_b == d
            if mine.any():
                tokens_bxT1[mine] = part.read(index_b[mine])
        return dict(tokens=tokens_bxT1, domains=domains_b)

    def epoch(self, step: int) -> float:
        """Passes over the most-repeated domain after ``step`` batches (its data repeats
        first: a heavily weighted small domain is seen many times)."""
        served = self.served_before(step * self.batch_size)
        return float(max(s / p.n_windows for s, p in zip(served, self.parts)))

    @property
    def tokens_served(self) -> int:
        return sum(p.tokens_served for p in self.parts)


def mixed_windows(dataset: MixtureDataset, seq_len: int,
                  max_windows: int | None = None) -> dict[str, np.ndarray]:
    """Validation windows in the order training mixes them, {"tokens": [N, T+1], "domains":
    [N]}: row g comes from domain ``MixtureBatches.domains_of(g)`` (seed 0), each domain's
    windows in order, up to ``max_windows`` rows or the row before a domain runs out.

    Per-domain evaluation reads these, not each domain alone: a model whose experts follow
    the domain (``MoEConfig.routing``) sees, in a batch of one domain, every token sent to
    the same experts, which overflow their capacity and drop tokens they never dropped in
    training, whose batches were mixed like these."""
    per_domain = domain_windows(dataset, seq_len, max_windows)  # no domain serves more rows
    available = [len(w["tokens"]) for w in per_domain]
    n = sum(available) if max_windows is None else max_windows
    domains_N = MixtureBatches(dataset, 1, seq_len).domains_of(np.arange(n))
    index_N = np.zeros(n, np.int64)
    for d in range(len(per_domain)):
        mine = domains_N == d
        index_N[mine] = np.arange(mine.sum())
    short = index_N >= np.asarray(available)[domains_N]
    n = int(np.argmax(short)) if short.any() else n  # stop before the first missing window
    tokens = np.stack([per_domain[d]["tokens"][i] for d, i in zip(domains_N[:n], index_N[:n])]) \
        if n else np.zeros((0, seq_len + 1), np.int32)
    return dict(tokens=tokens, domains=domains_N[:n].astype(np.int32))


def domain_windows(dataset: MixtureDataset, seq_len: int,
                   max_windows: int | None = None) -> list[dict[str, np.ndarray]]:
    """Each domain's first validation windows with its id, {"tokens": [N, T+1], "domains":
    [N]}: what per-domain evaluation reads (``palmlite.evaluate.evaluate(windows=...)``)."""
    out = []
    for d, part in enumerate(dataset.domains):
        tokens = part.windows(seq_len, max_windows)
        out.append(dict(tokens=tokens, domains=np.full(len(tokens), d, np.int32)))
    return out
