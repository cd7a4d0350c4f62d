"""Lossless tokenizers: a PaLM-style SentencePiece vocabulary and a byte-level baseline.

PaLM §2 (Vocabulary) uses a SentencePiece vocabulary that is *lossless*: whitespace is
kept exactly (it carries meaning in code), characters outside the vocabulary become their
UTF-8 bytes instead of an unknown token ("byte fallback"), and numbers are always split
into single digits (so "123.5" is 1 2 3 . 5, which helps arithmetic). ``train`` builds
such a vocabulary on any corpus; ``ByteTokenizer`` needs no training at all.

    tok = train(load_corpus("pystdlib"), 8192)    # cached: the second call only loads
    tok.pieces("    return x\\n")                  # ['▁▁▁▁return', '▁x', '\\n'] or similar
    tok.decode(tok.encode(text)) == text           # for every str that is valid Unicode

The guarantee ``decode(encode(s)) == s`` (default options) covers spaces, tabs, "\\r\\n",
control characters, emoji, unseen scripts and the SentencePiece meta symbol "▁" itself.
Lone surrogates such as "\\ud800" are not Unicode text and have no UTF-8 bytes: both
tokenizers reject them with a ValueError rather than change them silently.

Special ids: SentencePiece unk=0, bos=1, eos=2, pad=3; bytes b -> b, pad=256, bos=257,
eos=258. ``decode`` drops bos, eos and pad.
"""

from __future__ import annotations

import abc
import collections
import hashlib
import io
import json
import numbers
import os
import random
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from palmlite.files import atomic_write_bytes, atomic_write_text, cache_dir

MODEL_TYPES = ("bpe", "unigram")
META = "\u2581"  # "▁": SentencePiece writes every space as this symbol inside its pieces
RECIPE = "palmlite-sp-v1"  # bump when the chunking below changes: it keys the cache
LINES_PER_SENTENCE = 8     # training "sentences" are a few lines of a document ...
MAX_SENTENCE_CHARS = 2048  # ... cut at this length; SentencePiece skips over-long ones
# Default max_sentences (~8 lines each): 50k is all of pystdlib, and BPE learns 8k pieces from
# it in ~10 s on 2 cores; unigram's EM over long sentences needs ~60 s for 10k.
MAX_SENTENCES = {"bpe": 50_000, "unigram": 10_000}


class Tokenizer(abc.ABC):
    """What every tokenizer offers; datasets and runs record ``to_dict()``."""

    kind: str
    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int | None
    fingerprint: str
    options: dict = {}
    path: Path | None = None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abc.abstractmethod
    def id_to_piece(self, id: int) -> str: ...

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def pieces(self, text: str) -> list[str]:
        """How ``text`` splits, one string per token (for showing in notebooks)."""
        return [self.id_to_piece(i) for i in self.encode(text)]

    def to_dict(self) -> dict:
        return dict(kind=self.kind, name=self.name, vocab_size=self.vocab_size,
                    fingerprint=self.fingerprint, options=dict(self.options),
                    path=None if self.path is None else str(self.path))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, fingerprint {self.fingerprint[:12]})"


def _reject_surrogates(texts: Iterable[str]) -> None:
    """Raise a clear ValueError for the first lone surrogate in ``texts``."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"text contains the lone surrogate {text[e.start]!r} at index {e.start}: it is "
                f"not Unicode text and has no UTF-8 bytes, so it cannot be tokenized losslessly "
                f"(repair it first, e.g. text.encode('utf-8', 'replace').decode())") from None


class ByteTokenizer(Tokenizer):
    """The no-training baseline: one token per UTF-8 byte, lossless by construction."""

    kind = name = "bytes"
    vocab_size, pad_id, bos_id, eos_id, unk_id = 259, 256, 257, 258, None
    fingerprint = hashlib.sha256(b"bytes-v1").hexdigest()
    _SPECIALS = {256: "<pad>", 257: "<s>", 258: "</s>"}

    def encode(self, text: str) -> list[int]:
        _reject_surrogates([text])
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        # Sampled ids need not form valid UTF-8; show broken bytes as U+FFFD, as SentencePiece does.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def id_to_piece(self, id: int) -> str:
        id = int(id)
        if id in self._SPECIALS:
            return self._SPECIALS[id]
        if not 0 <= id < 256:
            raise ValueError(f"id {id} is outside the vocabulary [0, {self.vocab_size})")
        return chr(id) if 0x20 <= id < 0x7F else f"<0x{id:02X}>"


class SentencePieceTokenizer(Tokenizer):
    """A trained SentencePiece model (see ``train`` and ``load``)."""

    kind = "sentencepiece"

    def __init__(self, model: bytes, *, path: Path | None = None, options: dict | None = None,
                 num_threads: int | None = None):
        self._sp = spm.SentencePieceProcessor(model_proto=model)
        self.fingerprint = hashlib.sha256(model).hexdigest()
        self.path, self.options = path, dict(options or {})
        self.num_threads = num_threads or os.cpu_count() or 1
        self.vocab_size = self._sp.vocab_size()
        self.unk_id, self.bos_id = self._sp.unk_id(), self._sp.bos_id()
        self.eos_id, self.pad_id = self._sp.eos_id(), self._sp.pad_id()
        model_type = self.options.get("model_type")
        self.name = f"sp-{model_type}-{self.vocab_size}" if model_type else f"sp-{self.vocab_size}"
        if self.options.get("split_digits") is False:  # not PaLM's choice: say so in every record
            self.name += "-nosplit"
        # SentencePiece turns every "▁" into a space on decode, so a literal "▁" in the text
        # must be spelled as its three UTF-8 byte pieces (or unk without byte fallback).
        byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in META.encode()]
        self._meta_ids = byte_ids if all(map(self._sp.is_byte, byte_ids)) else [self.unk_id]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Encode many texts at once on ``num_threads`` threads (SentencePiece's own pool)."""
        parts = [text.split(META) for text in texts]  # almost always one part per text
        try:
            flat = self._sp.encode([p for ps in parts for p in ps], num_threads=self.num_threads)
        except (RuntimeError, TypeError):  # pybind11's opaque errors for unencodable strings
            _reject_surrogates(p for ps in parts for p in ps)
            raise
        out, i = [], 0
        for ps in parts:
            ids = flat[i]
            for segment in flat[i + 1:i + len(ps)]:
                ids += self._meta_ids + segment
            out.append(ids)
            i += len(ps)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return self._sp.decode(ids)

    def id_to_piece(self, id: int) -> str:
        if not 0 <= id < self.vocab_size:
            raise ValueError(f"id {id} is outside the vocabulary [0, {self.vocab_size})")
        return self._sp.id_to_piece(int(id))


def load(path: str | os.PathLike, *, num_threads: int | None = None) -> SentencePieceTokenizer:
    """Load a ``.model`` file written by ``train`` (or any SentencePiece model)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no SentencePiece model at {str(path)!r}")
    sidecar = _options_path(path)  # the training options, when train() wrote the model
    try:
        options = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(sidecar)!r} is not valid JSON ({e}): delete it, or retrain the "
                         "tokenizer") from None
    try:
        return SentencePieceTokenizer(path.read_bytes(), path=path, options=options,
                                      num_threads=num_threads)
    except RuntimeError as e:  # sentencepiece's parse error, e.g. "INTERNAL: ... ParseFromArray"
        raise ValueError(f"{str(path)!r} is not a SentencePiece model ({str(e).strip()}); train "
                         "one with tokenizer='bpe:SIZE' or 'unigram:SIZE'") from None


def train(source, vocab_size: int, *, model_type: str = "bpe", split_digits: bool = True,
          byte_fallback: bool = True, split_by_whitespace: bool = False,
          out: str | os.PathLike | None = None, max_sentences: int | None = None, seed: int = 0,
          character_coverage: float | None = None,
          num_threads: int | None = os.cpu_count()) -> SentencePieceTokenizer:
    """Train a lossless SentencePiece vocabulary with PaLM's options (PaLM §2).

    ``source``: a Corpus (anything with ``.documents``), an iterable of strings, or a path or
    corpus name for ``palmlite.data.load_corpus``. Documents are cut into sentences of a few
    lines that keep their newlines and indentation; at most ``max_sentences`` of them
    (default ``MAX_SENTENCES[model_type]``), drawn with ``seed``, are used.

    ``split_by_whitespace=False`` lets pieces cross spaces, so code idioms such as "\\n▁▁▁▁"
    or "):\\n▁▁▁▁" become single tokens: 4.07 instead of 3.60 bytes per token on pystdlib
    at 8k. SentencePiece's default (True) ends every piece at a space; unigram trains several
    times slower with False.

    ``split_digits`` splits the ASCII digits 0-9 (SentencePiece's rule, and PaLM's data):
    other Unicode digits ("٣", "𝟘") are ordinary characters and may merge with neighbours.

    ``character_coverage``: the share of the text's characters that get a piece of their
    own; the rest are spelled in bytes. None picks it from the data: 0.9999 (SentencePiece's
    default, 0.9995, leaves out more), lowered just enough for the characters to fit in
    vocab_size when the text has a long tail of rare ones (with byte fallback; SentencePiece
    goes no lower than 0.98).

    ``out=None`` stores the model in ``cache_dir("tokenizers")`` under a hash of the text and
    every option, and a later call with the same inputs just loads it; with ``out`` the model
    is always trained and written there.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is invalid: expected one of {MODEL_TYPES}")
    minimum = 4 + 256 * byte_fallback + 1  # unk bos eos pad, the 256 bytes, one character
    if not isinstance(vocab_size, numbers.Integral) or vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size!r} is invalid: it must be an integer >= {minimum} "
                         f"(4 special pieces{' + 256 byte pieces' if byte_fallback else ''} + "
                         f"the corpus's characters)")
    documents = _documents(source)
    max_sentences = max_sentences or MAX_SENTENCES[model_type]
    options = dict(recipe=RECIPE, text_fingerprint=_fingerprint(documents), model_type=model_type,
                   vocab_size=vocab_size, split_digits=split_digits, byte_fallback=byte_fallback,
                   split_by_whitespace=split_by_whitespace, max_sentences=max_sentences, seed=seed)
    if character_coverage is not None:  # (absent when None: the cache keys of before stay)
        if not MIN_COVERAGE <= character_coverage <= 1:
            raise ValueError(f"character_coverage={character_coverage!r} is invalid: expected "
                             f"a number from {MIN_COVERAGE} to 1 (SentencePiece's range), or "
                             "None (picked from the data)")
        options["character_coverage"] = character_coverage
    if out is None:
        key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
        out = cache_dir("tokenizers") / f"sp-{model_type}-{vocab_size}-{key}.model"
        if out.is_file():
            return load(out, num_threads=num_threads)
    sentences = _sample(_sentences(documents), max_sentences, seed)
    print(f"training a {model_type} tokenizer of {vocab_size} pieces on {len(sentences):,} "
          "sentences...", flush=True)
    model, coverage = _train_fitting(sentences, options, num_threads or 1)
    options["character_coverage_used"] = coverage
    atomic_write_text(_options_path(Path(out)), json.dumps(options, indent=1))
    atomic_write_bytes(out, model)  # last: a model file on disk is always a complete one
    return load(out, num_threads=num_threads)


MIN_COVERAGE = 0.98  # SentencePiece refuses a character_coverage below this


def _train_fitting(sentences: list[str], options: dict, num_threads: int) -> tuple[bytes, float]:
    """(model, its character coverage). With the coverage picked from the data, a vocabulary
    SentencePiece still finds a few characters too small for (it counts them its own way)
    is retried with that many fewer, twice at most."""
    slack = 0
    for attempt in range(3):
        coverage = options.get("character_coverage") or _coverage(sentences, options, slack)
        try:
            return _train_model(sentences, options, coverage, num_threads), coverage
        except _VocabTooSmall as e:
            if "character_coverage" in options or coverage <= MIN_COVERAGE or attempt == 2:
                raise
            slack += e.needed - options["vocab_size"]


def _coverage(sentences: list[str], options: dict, slack: int = 0,
              default: float = 0.9999) -> float:
    """``default``, or with byte fallback the largest coverage whose characters fit in the
    vocabulary beside the special and byte pieces (SentencePiece keeps the most frequent
    characters until their share of the text reaches the coverage)."""
    counts = sorted(collections.Counter("".join(sentences)).values(), reverse=True)
    room = options["vocab_size"] - 4 - 256 * options["byte_fallback"] - 1 - slack
    share = np.cumsum(counts) / max(sum(counts), 1)
    if not options["byte_fallback"] or len(counts) <= room:
        return default
    if room < 1:
        return MIN_COVERAGE  # no room for any character: SentencePiece will say how many
    if share[room - 1] >= default:
        return default
    # the room most frequent characters, and no more (if SentencePiece allows so few)
    return max(float(share[room - 1]) - 1e-9, MIN_COVERAGE)


def _train_model(sentences: list[str], options: dict, coverage: float,
                 num_threads: int) -> bytes:
    _reject_surrogates(sentences)  # else pybind11 fails mid-training with an opaque message
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buffer,
            vocab_size=options["vocab_size"], model_type=options["model_type"],
            split_digits=options["split_digits"], byte_fallback=options["byte_fallback"],
            split_by_whitespace=options["split_by_whitespace"],
            # Lossless (PaLM §2): no normalisation (NFKC would turn "ﬁ" into "fi"), keep every
            # space, add no space in front of the text, and allow pieces made of spaces only.
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            # Characters left out are spelled in bytes (see train's character_coverage).
            character_coverage=coverage,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            max_sentence_length=4 * MAX_SENTENCE_CHARS,  # bytes, and a char has at most 4
            num_threads=num_threads, minloglevel=2)  # 2: errors only, no training log
    except RuntimeError as e:
        raise _vocab_size_error(str(e), options["vocab_size"]) from e
    return buffer.getvalue()


class _VocabTooSmall(ValueError):
    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = needed


def _vocab_size_error(message: str, vocab_size: int) -> Exception:
    """Turn SentencePiece's vocabulary-size errors into a ValueError that states the limit."""
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return _VocabTooSmall(
            f"vocab_size={vocab_size} is too small for this text: it needs at least {m[1]} "
            "(special pieces, byte pieces and the text's characters)", needed=int(m[1]))
    if m := re.search(r"value <= (\d+)", message):
        return ValueError(f"vocab_size={vocab_size} is too large for this text: at most {m[1]} "
                          f"pieces can be learned from it (use more text or a smaller vocab_size)")
    return RuntimeError(f"SentencePiece training failed: {message}")


def _documents(source) -> list[str]:
    if isinstance(source, (str, os.PathLike)):
        from palmlite.data import load_corpus  # lazy: the tokenizer needs no corpus code
        source = load_corpus(source)
    documents = list(getattr(source, "documents", source))
    if not any(documents):
        raise ValueError("the training text is empty: there is nothing to learn a vocabulary from")
    return documents


def _fingerprint(documents: list[str]) -> str:
    """sha256 of the documents' UTF-8 bytes, each prefixed by its length (unambiguous)."""
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def _sentences(documents: list[str]) -> Iterator[str]:
    """A few lines at a time, newlines and indentation kept, cut at MAX_SENTENCE_CHARS.

    SentencePiece learns only within a sentence: one line per sentence would hide every
    "line end + next indentation" from it, one whole file per sentence is too long."""
    for doc in documents:
        lines = doc.splitlines(keepends=True)
        for i in range(0, len(lines), LINES_PER_SENTENCE):
            chunk = "".join(lines[i:i + LINES_PER_SENTENCE])
            for j in range(0, len(chunk), MAX_SENTENCE_CHARS):
                yield chunk[j:j + MAX_SENTENCE_CHARS]


def _sample(sentences: Iterable[str], k: int, seed: int) -> list[str]:
    """At most ``k`` sentences, the same ones for the same seed."""
    sentences = [s for s in sentences if s]
    return sentences if len(sentences) <= k else random.Random(seed).sample(sentences, k)


def _options_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + ".json")
