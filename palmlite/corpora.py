"""Text corpora by name or path: offline by default, downloads verified by sha256.

``load_corpus(name_or_path)`` returns a ``Corpus``: documents as strings plus a content
fingerprint that every dataset and run records. Names:

- ``"pystdlib"`` (default): this Python's standard-library sources (no tests, no
  site-packages), ~12 MB of real human-written code, always present, no network.
- ``"pydocs"``: the English reference prose shipped with Python (``pydoc_data.topics``).
- ``"arithmetic"``: seeded synthetic problems such as ``4821+97=4918`` (see arithmetic.py),
  one per document; ``"arithmetic:max_digits=2,lines=8"`` sets options (``arithmetic_corpus``).
- ``"tinyshakespeare"`` (and any name in ``DOWNLOADS``): fetched once over HTTPS into the
  cache directory and checked against its sha256.
- ``"tinystories"`` or ``"hf:OWNER/NAME"``: a Hugging Face dataset, when the optional
  ``datasets`` package is installed.
- ``"mix:pystdlib=0.4,pydocs=0.3,arithmetic=0.3"``: a ``Mixture`` of named corpora with
  sampling weights (normalised to sum to 1); each is a domain, numbered in order. A component
  with commas in its own options goes in parentheses: ``mix:pydocs=1,(arithmetic:n=500,
  lines=4)=1``. ``MIXTURES`` names a few (``"code-prose-arithmetic"``).
- anything else: a local file, directory or glob of UTF-8 text files.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import sysconfig
import urllib.error
import urllib.request
from pathlib import Path

from palmlite import arithmetic
from palmlite.files import atomic_path, cache_dir, sha256_file
from palmlite.train_config import MIXTURES, mixture_spec, parse_mixture

OFFLINE = ("pystdlib", "pydocs", "arithmetic")


@dataclasses.dataclass(frozen=True)
class Download:
    url: str
    sha256: str


DOWNLOADS = {
    # Karpathy's char-rnn Tiny Shakespeare: 1,115,394 bytes.
    "tinyshakespeare": Download(
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}
HF_ALIASES = {"tinystories": "roneneldan/TinyStories"}


@dataclasses.dataclass(frozen=True, repr=False)
class Corpus:
    name: str
    documents: tuple[str, ...]

    def __post_init__(self):
        if not any(self.documents):
            raise ValueError(f"corpus {self.name!r} is empty: it has no non-empty document")

    @property
    def fingerprint(self) -> str:
        """sha256 of the documents' UTF-8 bytes, each prefixed by its length."""
        digest = hashlib.sha256()
        for doc in self.documents:
            data = doc.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little") + data)
        return digest.hexdigest()

    @property
    def n_bytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.documents)

    def to_dict(self) -> dict:
        return dict(name=self.name, fingerprint=self.fingerprint, documents=len(self.documents),
                    bytes=self.n_bytes)

    def __repr__(self) -> str:
        return (f"Corpus({self.name!r}, {len(self.documents):,} documents, "
                f"{self.n_bytes / 1e6:.2f} MB, fingerprint {self.fingerprint[:12]})")


@dataclasses.dataclass(frozen=True, repr=False)
class Mixture(Corpus):
    """Corpora sampled with weights, each a domain (Pathways: one model, many tasks).

    ``documents`` are all the components' (what a tokenizer is trained on); training
    batches draw each sequence from one domain (``palmlite.mixture``). The fingerprint
    covers the components' fingerprints and the weights."""

    components: tuple[Corpus, ...] = ()
    weights: tuple[float, ...] = ()

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    @property
    def fingerprint(self) -> str:
        parts = [[c.fingerprint, w] for c, w in zip(self.components, self.weights)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def to_dict(self) -> dict:
        return dict(super().to_dict(), domains=[dict(c.to_dict(), weight=w) for c, w in
                                                zip(self.components, self.weights)])

    def __repr__(self) -> str:
        return f"Mixture({', '.join(f'{c.name}={w:.3g}' for c, w in zip(self.components, self.weights))})"


def load_corpus(name_or_path: str | os.PathLike = "pystdlib", **options) -> Corpus:
    """A corpus by name (see the module docstring) or from local text files."""
    name = str(name_or_path)
    if (spec := mixture_spec(name)) is not None:
        parsed = parse_mixture(spec)
        components = tuple(load_corpus(n) for n, _ in parsed)
        return Mixture(name, tuple(d for c in components for d in c.documents), components,
                       tuple(w for _, w in parsed))
    if name == "pystdlib":
        return Corpus(name, tuple(_read(p) for p in pystdlib_files()))
    if name == "pydocs":
        from pydoc_data.topics import topics
        return Corpus(name, tuple(topics[k] for k in sorted(topics)))
    if name == "arithmetic" or name.startswith("arithmetic:"):
        return arithmetic_corpus(name, **options)
    if name in DOWNLOADS:
        return Corpus(name, (_read(fetch(name)),))
    if name in HF_ALIASES or name.startswith("hf:"):
        return _load_hugging_face(HF_ALIASES.get(name, name.removeprefix("hf:")), **options)
    return _load_local(name)


def arithmetic_corpus(spec: str = "arithmetic", **options) -> Corpus:
    """Arithmetic problems, options from ``spec`` ("arithmetic:KEY=VALUE,...") or keywords.

    The keys are those of ``arithmetic.problems`` (n, seed, operators, min_digits,
    max_digits) and ``lines``: problems per document, one per line (default 1, no newline).
    With lines > 1 a document looks like a k-shot prompt ("2+3=5\\n17-4=13\\n..."), so a
    model trained on it has seen the format that few-shot evaluation uses.
    """
    _, _, text = spec.partition(":")
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        options[key] = int(value) if re.fullmatch(r"-?\d+", value) else value
    allowed = ("n", "seed", "operators", "min_digits", "max_digits", "lines")
    if unknown := sorted(set(options) - set(allowed)):
        raise ValueError(f"corpus {spec!r}: unknown option(s) {unknown}; expected {allowed}")
    for key in sorted(set(options) - {"operators"}):
        if not isinstance(options[key], int) or isinstance(options[key], bool):
            raise ValueError(f"corpus {spec!r}: {key}={options[key]!r} is invalid: expected an integer")
    lines = options.pop("lines", 1)
    if not (isinstance(lines, int) and lines >= 1):
        raise ValueError(f"corpus {spec!r}: lines={lines!r} is invalid: expected an integer >= 1")
    texts = [p.text for p in arithmetic.problems(**options)]
    return Corpus(spec, tuple("\n".join(texts[i:i + lines]) for i in range(0, len(texts), lines)))


def pystdlib_files() -> list[Path]:
    """The standard library's .py files, sorted, without tests and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if d not in skip]  # prune: never walk site-packages
        files += [Path(folder, n) for n in names if n.endswith(".py") and not n.startswith("test_")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def fetch(name: str) -> Path:
    """Download ``DOWNLOADS[name]`` once into the cache, verified by sha256."""
    spec = DOWNLOADS[name]
    path = cache_dir("downloads") / f"{name}.txt"
    if path.exists() and sha256_file(path) == spec.sha256:
        return path
    try:
        with atomic_path(path) as tmp:  # a failed or partial download never lands at `path`
            with urllib.request.urlopen(spec.url, timeout=60) as response, open(tmp, "wb") as f:
                while block := response.read(1 << 20):
                    f.write(block)
            if (got := sha256_file(tmp)) != spec.sha256:
                raise ValueError(f"download of {name!r} from {spec.url} has sha256 {got}, "
                                 f"expected {spec.sha256}; the file was deleted")
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(
            f"could not download {name!r} from {spec.url} ({e}). Offline corpora need no "
            f"network: {', '.join(OFFLINE)}, or a local file, directory or glob.") from e
    return path


def _read(path: Path) -> str:
    try:  # newline="" keeps "\r\n" as it is: the corpus is exactly the text on disk
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({e})") from e


def _load_local(pattern: str) -> Corpus:
    path = Path(pattern).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(
            f"no corpus named {pattern!r} and no such file, directory or glob: {str(path)!r}. "
            f"Named corpora: {', '.join(OFFLINE + tuple(DOWNLOADS) + tuple(HF_ALIASES) + tuple(MIXTURES))}")
    return Corpus(str(pattern), tuple(_read(p) for p in files))


def _load_hugging_face(dataset: str, split: str = "train", field: str = "text",
                       max_documents: int | None = 100_000) -> Corpus:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"the corpus {dataset!r} comes from Hugging Face: "
                          f"`pip install datasets` first (offline corpora: {OFFLINE})") from e
    ds = datasets.load_dataset(dataset, split=split, streaming=True)
    docs = []
    for row in ds:
        if max_documents is not None and len(docs) >= max_documents:
            break
        docs.append(row[field])
    return Corpus(f"hf:{dataset}", tuple(docs))
