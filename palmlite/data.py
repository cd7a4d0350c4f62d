"""Token datasets: tokenise a corpus once, cache it, serve [B, T+1] windows, count epochs.

    corpus = load_corpus("pystdlib")
    train = TokenDataset(corpus, tokenizer, split="train")
    batches = train.batches(batch_size=16, seq_len=256, seed=0)
    x_BxT1 = batches.get(step)       # a pure function of (seed, step): resumable

The split is by document (deterministic in ``seed``), so validation text never leaks into
training windows. Windows are drawn without replacement; once every window has been served
the data repeats, and ``Batches`` warns once: PaLM trained exactly one epoch, and repeated
data changes what a scaling study measures.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np

from palmlite.corpora import Corpus, load_corpus
from palmlite.files import atomic_path, atomic_write_text, cache_dir

__all__ = ["Corpus", "load_corpus", "TokenDataset", "Batches", "split_documents", "get_tokenizer",
           "tokenizer_options"]
FORMAT_VERSION = 1


def split_documents(n_docs: int, split: str, val_fraction: float, seed: int) -> np.ndarray:
    """Document indices of ``split``: a seeded shuffle, the first ``val_fraction`` is validation."""
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r} is invalid: expected 'train' or 'validation'")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: expected 0 < value < 1")
    if n_docs < 2:
        raise ValueError(f"a train/validation split needs at least 2 documents, got {n_docs}")
    order = np.random.default_rng(seed).permutation(n_docs)
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    return np.sort(order[:n_val] if split == "validation" else order[n_val:])


def tokenizer_options(spec: str) -> dict | None:
    """The ``tokenizer.train`` options a spec asks for; None for "bytes" or a path.

    "bpe:SIZE" and "unigram:SIZE" use PaLM's options, numbers split into single digits
    (PaLM §2); a ":nosplit" suffix ("bpe:512:nosplit") lets BPE merge digits into pieces
    such as "48" or "=4", the tokenization PaLM avoids (notebook 08 compares the two).
    """
    kind, _, rest = spec.partition(":")
    if kind not in ("bpe", "unigram"):
        return None
    size, _, option = rest.partition(":")
    if not (size.isdigit() and int(size) > 0 and option in ("", "nosplit")):
        raise ValueError(f"tokenizer={spec!r} is invalid: expected 'bytes', '{kind}:SIZE' or "
                         f"'{kind}:SIZE:nosplit' with a positive integer SIZE, or a .model path")
    return dict(model_type=kind, vocab_size=int(size), split_digits=option != "nosplit")


def get_tokenizer(spec: str, corpus: Corpus):
    """"bytes" | "bpe:SIZE[:nosplit]" | "unigram:SIZE[:nosplit]" (trained on ``corpus``,
    cached; see ``tokenizer_options``) | a .model path."""
    from palmlite import tokenizer
    if spec == "bytes":
        return tokenizer.ByteTokenizer()
    if (options := tokenizer_options(spec)) is not None:
        return tokenizer.train(corpus, **options)
    return tokenizer.load(spec)


CHECKSUM_FULL_BYTES = 256 * 2**20  # token caches up to this size are hashed whole (~0.4 s)
CHECKSUM_BLOCKS = 64  # larger ones: this many 1 MiB blocks, evenly spaced, and the size


class TokenDataset:
    """One split of a corpus as a flat token array (documents joined by EOS), memory-mapped."""

    def __init__(self, corpus: Corpus | str, tokenizer, *, split: str = "train",
                 val_fraction: float = 0.05, seed: int = 0):
        self.corpus = load_corpus(corpus) if isinstance(corpus, str) else corpus
        self.tokenizer = tokenizer
        self.split, self.val_fraction, self.seed = split, val_fraction, seed
        self.doc_ids = split_documents(len(self.corpus.documents), split, val_fraction, seed)
        self.meta = dict(format=FORMAT_VERSION, corpus=self.corpus.fingerprint,
                         tokenizer=tokenizer.fingerprint, split=split,
                         val_fraction=val_fraction, seed=seed)
        key = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:24]
        self.path = cache_dir("tokens") / f"{self.corpus.name.replace('/', '_')[:40]}-{key}.bin"
        self.dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
        self.tokens = self._load() if self._cache_is_valid() else self._build()

    # ---- cache -------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.path.with_suffix(".json")

    def _cache_is_valid(self) -> bool:
        try:
            saved = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return False
        same = all(saved.get(k) == v for k, v in self.meta.items())
        sized = self.path.exists() and self.path.stat().st_size == saved.get("n_tokens", -1) * \
            self.dtype.itemsize
        # The content too (a same-size file of zeros, an edited n_bytes or n_tokens): rebuilt.
        ok = same and sized and saved.get("checksum") == self._checksum(saved["n_tokens"],
                                                                         saved.get("n_bytes"))
        if ok:
            self.n_bytes = saved["n_bytes"]
        return ok

    def _checksum(self, n_tokens: int, n_bytes: int) -> str:
        """SHA-256 of the counts and the token file: all of it up to CHECKSUM_FULL_BYTES,
        else CHECKSUM_BLOCKS evenly spaced blocks of up to 1 MiB (and the size, via the
        counts)."""
        digest = hashlib.sha256(f"{n_tokens},{n_bytes}".encode())
        size = self.path.stat().st_size
        block = max(1, min(2**20, size // CHECKSUM_BLOCKS))
        with open(self.path, "rb") as f:
            if size <= CHECKSUM_FULL_BYTES:
                for chunk in iter(lambda: f.read(2**24), b""):
                    digest.update(chunk)
            else:
                for offset in np.linspace(0, size - block, CHECKSUM_BLOCKS).astype(np.int64):
                    f.seek(int(offset))
                    digest.update(f.read(block))
        return digest.hexdigest()

    def _load(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r")

    def _build(self) -> np.memmap:
        docs = [self.corpus.documents[i] for i in self.doc_ids]
        what = f"tokenising {self.corpus.name} ({self.split}) with {self.tokenizer.name}"
        ids = _encode_with_progress(self.tokenizer, docs, what)
        eos = self.tokenizer.eos_id
        flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=self.dtype,
                           count=sum(len(d) + 1 for d in ids))
        self.n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        self.meta_path.unlink(missing_ok=True)  # never pair new tokens with old metadata
        with atomic_path(self.path) as tmp:
            flat.tofile(tmp)
        atomic_write_text(self.meta_path, json.dumps(
            {**self.meta, "n_tokens": int(flat.size), "n_bytes": self.n_bytes,
             "checksum": self._checksum(int(flat.size), self.n_bytes),
             "tokenizer_name": self.tokenizer.name, "corpus_name": self.corpus.name}, indent=1))
        return self._load()

    # ---- sizes -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.tokens.size)

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token: converts loss per token into bits per byte."""
        return self.n_bytes / len(self)

    def bits_per_byte(self, loss_nats_per_token: float) -> float:
        """Tokenizer-independent loss: nats/token -> bits/byte."""
        return loss_nats_per_token / math.log(2) / self.bytes_per_token

    def to_dict(self) -> dict:
        return dict(**self.meta, n_tokens=len(self), n_bytes=self.n_bytes,
                    bytes_per_token=self.bytes_per_token, corpus_name=self.corpus.name,
                    tokenizer_name=self.tokenizer.name)

    def batches(self, batch_size: int, seq_len: int, seed: int = 0) -> "Batches":
        return Batches(self, batch_size, seq_len, seed)

    def windows(self, seq_len: int, max_windows: int | None = None) -> np.ndarray:
        """Consecutive [N, T+1] windows in order (for evaluation)."""
        n = (len(self) - 1) // seq_len
        if max_windows is not None:
            n = min(n, max_windows)
        idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
        return np.asarray(self.tokens[idx], dtype=np.int32)


class Batches:
    """[B, T+1] windows without replacement; ``get(step)`` depends only on (seed, step)."""

    def __init__(self, dataset: TokenDataset, batch_size: int, seq_len: int, seed: int = 0):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
        self.n_windows = (len(dataset) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"the {dataset.split} split has {len(dataset)} tokens: too few for "
                             f"one window of seq_len={seq_len} + 1")
        self.dataset, self.batch_size, self.seq_len, self.seed = dataset, batch_size, seq_len, seed
        self.tokens_served = 0
        self._warned = False
        self._order: tuple[int, np.ndarray] | None = None

    def epoch(self, step: int) -> float:
        """Passes over the data completed after ``step`` batches (fractional)."""
        return step * self.batch_size / self.n_windows

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))
        return self._order[1]

    def window_starts(self, step: int, rows: slice = slice(None)) -> np.ndarray:
        """Flat token offsets of the windows of ``step``'s batch (or of its ``rows``): each a
        multiple of seq_len (RETRO's neighbours are looked up by window: ``palmlite.retro_data``)."""
        g = step * self.batch_size + np.arange(self.batch_size)[rows]  # global window indices
        return self.starts_of(g)

    def starts_of(self, g: np.ndarray) -> np.ndarray:
        """Flat token offsets of the g-th windows served (g counts from 0 over the epochs)."""
        epochs, pos = np.divmod(np.asarray(g, np.int64), self.n_windows)
        return np.array([self._permutation(e)[p] for e, p in zip(epochs, pos)],
                        dtype=np.int64).reshape(-1) * self.seq_len

    def get(self, step: int, rows: slice = slice(None)) -> np.ndarray:
        """The batch for ``step``: int32 [batch_size, seq_len + 1], or only its ``rows``
        (what one host of several reads: ``sharding.place_batch``)."""
        return self.read(step * self.batch_size + np.arange(self.batch_size)[rows])

    def read(self, g: np.ndarray) -> np.ndarray:
        """The g-th windows served, int32 [len(g), seq_len + 1] (a mixture's domains each
        serve their own count: ``palmlite.mixture``)."""
        g = np.asarray(g, np.int64)
        if len(g) and g.max() >= self.n_windows and not self._warned:
            self._warned = True
            warnings.warn(f"training has gone past one epoch of {self.dataset.corpus.name!r} "
                          f"({self.dataset.split}: {len(self.dataset):,} tokens): data now "
                          "repeats. PaLM trained exactly one epoch; repeated data changes "
                          "scaling results.", RuntimeWarning, stacklevel=3)
        starts = self.starts_of(g)
        self.tokens_served += len(g) * self.seq_len
        return np.asarray(self.dataset.tokens[starts[:, None] + np.arange(self.seq_len + 1)],
                          dtype=np.int32)

    def __iter__(self):
        step = 0
        while True:
            yield self.get(step)
            step += 1


def _encode_with_progress(tokenizer, docs: list[str], what: str, chunk: int = 512) -> list[list[int]]:
    """``tokenizer.encode_batch(docs)`` in chunks, with a bar (once per corpus and
    tokenizer: the token cache keeps the result)."""
    from tqdm.auto import tqdm
    ids = []
    with tqdm(total=sum(map(len, docs)), desc=what, unit="char", unit_scale=True, leave=False,
              mininterval=1) as bar:
        for i in range(0, len(docs), chunk):
            ids += tokenizer.encode_batch(docs[i:i + chunk])
            bar.update(sum(map(len, docs[i:i + chunk])))
    return ids
