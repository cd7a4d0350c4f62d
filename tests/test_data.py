import numpy as np
import pytest

from palmlite.data import Corpus, TokenDataset, split_documents
from palmlite.tokenizer import ByteTokenizer

DOCS = tuple(f"document {i}: " + "x = %d\n" % i * (i % 5 + 1) for i in range(40))


class CountingBytes(ByteTokenizer):
    """ByteTokenizer that counts how often a dataset is tokenised with it (to see the cache
    work): ``calls`` is the number of token-cache builds (each encodes in several chunks)."""

    calls = 0


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PALMLITE_CACHE", str(tmp_path / "cache"))
    CountingBytes.calls = 0
    build = TokenDataset._build

    def counted(self):
        CountingBytes.calls += isinstance(self.tokenizer, CountingBytes)
        return build(self)

    monkeypatch.setattr(TokenDataset, "_build", counted)
    return tmp_path / "cache"


def test_split_is_by_document_deterministic_and_disjoint():
    train = split_documents(100, "train", 0.1, seed=3)
    val = split_documents(100, "validation", 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert set(train) | set(val) == set(range(100)) and not set(train) & set(val)
    np.testing.assert_array_equal(val, split_documents(100, "validation", 0.1, seed=3))
    assert set(val) != set(split_documents(100, "validation", 0.1, seed=4))
    with pytest.raises(ValueError, match="split"):
        split_documents(100, "test", 0.1, 0)


def test_tokens_are_the_documents_joined_by_eos():
    tok = ByteTokenizer()
    ds = TokenDataset(Corpus("c", DOCS), tok, split="validation", val_fraction=0.1, seed=0)
    expected = [t for i in ds.doc_ids for t in tok.encode(DOCS[i]) + [tok.eos_id]]
    np.testing.assert_array_equal(np.asarray(ds.tokens), expected)
    assert ds.tokens.dtype == np.uint16
    assert ds.bytes_per_token == pytest.approx(ds.n_bytes / len(ds))
    assert ds.bits_per_byte(np.log(2) * ds.bytes_per_token) == pytest.approx(1.0)


def test_cache_is_reused_and_invalidated():
    corpus = Corpus("c", DOCS)
    first = TokenDataset(corpus, CountingBytes())
    again = TokenDataset(corpus, CountingBytes())
    assert CountingBytes.calls == 1 and again.path == first.path
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(first.tokens))
    TokenDataset(Corpus("c", DOCS[:-1]), CountingBytes())  # other corpus: rebuilt
    TokenDataset(corpus, CountingBytes(), seed=1)  # other split: rebuilt
    assert CountingBytes.calls == 3


def test_corrupted_cache_is_rebuilt_never_read_as_garbage():
    corpus = Corpus("c", DOCS)
    good = np.asarray(TokenDataset(corpus, CountingBytes()).tokens).copy()
    path = TokenDataset(corpus, CountingBytes()).path
    with open(path, "r+b") as f:  # a truncated token file (e.g. a killed write by hand)
        f.truncate(10)
    np.testing.assert_array_equal(np.asarray(TokenDataset(corpus, CountingBytes()).tokens), good)
    path.with_suffix(".json").write_text("{not json")
    np.testing.assert_array_equal(np.asarray(TokenDataset(corpus, CountingBytes()).tokens), good)
    assert CountingBytes.calls == 3
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["zeros", "truncated_and_recounted", "n_bytes_edited"])
def test_a_cache_damaged_behind_its_size_check_is_rebuilt(damage, monkeypatch):
    """Issue 13: the cache was trusted on its size and JSON. A same-size file of zeros, a
    truncated file with a matching n_tokens, or an edited n_bytes (which scales every
    bits/byte figure) are caught by the stored checksum and rebuilt. The sampled-block
    checksum of large caches (forced here with a tiny threshold) catches the zeros too."""
    import json

    import palmlite.data as data
    if damage == "zeros":
        monkeypatch.setattr(data, "CHECKSUM_FULL_BYTES", 16)
    corpus = Corpus("c", DOCS * 30)
    good = TokenDataset(corpus, CountingBytes())
    tokens, n_bytes, path = np.asarray(good.tokens).copy(), good.n_bytes, good.path
    meta = json.loads(path.with_suffix(".json").read_text())
    if damage == "zeros":
        path.write_bytes(bytes(path.stat().st_size))
    elif damage == "truncated_and_recounted":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
        meta["n_tokens"] //= 2
    else:
        meta["n_bytes"] *= 2
    path.with_suffix(".json").write_text(json.dumps(meta))
    again = TokenDataset(corpus, CountingBytes())
    assert CountingBytes.calls == 2  # rebuilt
    np.testing.assert_array_equal(np.asarray(again.tokens), tokens)
    assert again.n_bytes == n_bytes


def test_batches_are_windows_of_the_data_without_replacement():
    ds = TokenDataset(Corpus("c", DOCS), ByteTokenizer())
    batches = ds.batches(batch_size=4, seq_len=16, seed=0)
    flat = np.asarray(ds.tokens)
    starts = set()
    for step in range(batches.n_windows // 4):
        x = batches.get(step)
        assert x.shape == (4, 17) and x.dtype == np.int32
        for row in x:
            start = next(s for s in range(0, len(flat) - 16, 16)
                         if np.array_equal(flat[s:s + 17], row))
            starts.add(start)
    assert len(starts) == (batches.n_windows // 4) * 4  # no window served twice in an epoch
    np.testing.assert_array_equal(batches.get(3), ds.batches(4, 16, seed=0).get(3))
    # A host of several reads only its rows of the same batch (sharding.place_batch).
    host = ds.batches(4, 16, seed=0)
    np.testing.assert_array_equal(host.get(3, slice(2, 4)), batches.get(3)[2:4])
    assert host.tokens_served == 2 * 16
    assert not np.array_equal(batches.get(3), ds.batches(4, 16, seed=1).get(3))
    assert batches.tokens_served == (batches.n_windows // 4 + 3) * 4 * 16


def test_warns_once_past_one_epoch():
    ds = TokenDataset(Corpus("c", DOCS), ByteTokenizer())
    batches = ds.batches(batch_size=8, seq_len=32)
    last_in_epoch = batches.n_windows // 8 - 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(last_in_epoch + 1):
            batches.get(step)
    with pytest.warns(RuntimeWarning, match="past one epoch"):
        batches.get(last_in_epoch + 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        batches.get(last_in_epoch + 3)
    assert batches.epoch(last_in_epoch + 3) > 1


def test_too_little_data_for_a_window():
    ds = TokenDataset(Corpus("c", ("ab", "cd")), ByteTokenizer())
    with pytest.raises(ValueError, match="too few"):
        ds.batches(batch_size=2, seq_len=64)


def test_tokenizer_specs_parse_with_and_without_digit_splitting():
    from palmlite.data import tokenizer_options
    assert tokenizer_options("bpe:512") == dict(model_type="bpe", vocab_size=512, split_digits=True)
    assert tokenizer_options("unigram:300:nosplit") == dict(model_type="unigram", vocab_size=300,
                                                            split_digits=False)
    assert tokenizer_options("bytes") is None and tokenizer_options("runs/x/tok.model") is None
    for bad in ("bpe:lots", "bpe:0", "bpe:512:split", "unigram:", "bpe:512:nosplit:x"):
        with pytest.raises(ValueError, match="tokenizer="):
            tokenizer_options(bad)


def test_nosplit_tokenizer_merges_digits_and_is_cached_apart(cache):
    from palmlite.data import get_tokenizer, load_corpus
    corpus = load_corpus("arithmetic:n=3000,max_digits=3")
    # Split digits leave 260 specials and bytes + 13 characters + 1 merge ("=-") to learn.
    split, merged = get_tokenizer("bpe:274", corpus), get_tokenizer("bpe:400:nosplit", corpus)
    text = "482+97=579"
    assert split.pieces(text) == list(text)
    assert any(sum(c.isdigit() for c in piece) > 1 for piece in merged.pieces(text))
    assert merged.decode(merged.encode(text)) == text
    assert (split.options["split_digits"], merged.options["split_digits"]) == (True, False)
    assert (split.name, merged.name) == ("sp-bpe-274", "sp-bpe-400-nosplit")
    assert split.fingerprint != merged.fingerprint and split.path != merged.path
    assert get_tokenizer("bpe:400:nosplit", corpus).path == merged.path  # loaded from the cache
    assert len(list((cache / "tokenizers").glob("*.model"))) == 2


def test_an_empty_cache_variable_means_the_default_not_the_working_directory(monkeypatch, tmp_path):
    from palmlite.files import cache_dir
    monkeypatch.setenv("PALMLITE_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert cache_dir("tokenizers") == tmp_path / ".cache" / "palmlite" / "tokenizers"


def test_encoding_in_chunks_with_a_bar_equals_encoding_at_once():
    from palmlite.data import _encode_with_progress
    tok = ByteTokenizer()
    docs = DOCS * 3
    assert _encode_with_progress(tok, docs, "test", chunk=2) == tok.encode_batch(docs)
