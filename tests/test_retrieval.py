"""RETRO's retrieval side: the chunk database, BM25 and dense keys, faiss search, the
neighbour cache (palmlite.retrieval), batches with neighbours (palmlite.retro_data), and the
leakage measure (palmlite.evaluate)."""

import math
from pathlib import Path

import numpy as np
import pytest

from palmlite.corpora import Corpus
from palmlite.data import TokenDataset
from palmlite.evaluate import chunk_overlap, longest_common_substring
from palmlite.retrieval import (BM25Index, ChunkDatabase, FaissIndex, ModelEmbedder, Retriever,
                                parse_index_spec, precompute_neighbours)
from palmlite.retro_data import NeighbourBatches, neighbour_windows
from palmlite.tokenizer import ByteTokenizer

M, SEQ_LEN = 8, 32  # 4 chunks per window
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()


def toy_corpus(n_docs: int = 30, seed: int = 0) -> Corpus:
    """Documents of random words; each repeats its own opening (same-document neighbours to
    exclude) and shares one of five sentences with other documents (neighbours to find)."""
    rng = np.random.default_rng(seed)
    shared = [" ".join(rng.choice(WORDS, 6)) for _ in range(5)]
    docs = []
    for i in range(n_docs):
        own = " ".join(rng.choice(WORDS, int(rng.integers(8, 30))))
        docs.append(f"{own}. {shared[i % 5]}. {own[:30]}")
    return Corpus("toy", tuple(docs))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PALMLITE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def train(cache):
    return TokenDataset(toy_corpus(), ByteTokenizer(), split="train", val_fraction=0.2)


def document_of_every_token(dataset) -> np.ndarray:
    """Brute force: the document of each flat position (EOS ends, and belongs to, one)."""
    eos = np.asarray(dataset.tokens) == dataset.tokenizer.eos_id
    return np.cumsum(eos) - eos


def touches(doc, start, length, first, last) -> np.ndarray:
    """Whether tokens start .. start+length-1 (clipped to the array) meet documents first..last."""
    end = np.minimum(start + length - 1, len(doc) - 1)
    return (doc[end] >= first) & (doc[start] <= last)


# ---- the database ------------------------------------------------------------------------
def test_database_chunks_values_and_document_ranges(train):
    db = ChunkDatabase(train, M)
    flat, doc = np.asarray(train.tokens), document_of_every_token(train)
    assert len(db) == len(flat) // M and (db.flat_ids == np.arange(len(db))).all()
    ids = np.array([0, 5, len(db) - 1])
    values = db.values(ids, 2 * M)
    for i, v in zip(ids, values):  # the chunk and its continuation, EOS past the end
        expected = flat[i * M:i * M + 2 * M]
        assert v.tolist() == expected.tolist() + [train.tokenizer.eos_id] * (2 * M - len(expected))
    assert db.values(ids, 2 * M).dtype == np.int32
    assert (db.chunks(ids) == values[:, :M]).all()
    starts = db.flat_ids * M
    assert (db.first_doc == doc[starts]).all() and (db.last_doc == doc[starts + M - 1]).all()
    assert (db.continuation_last_doc == doc[np.minimum(starts + 2 * M - 1, len(flat) - 1)]).all()
    assert (db.last_doc > db.first_doc).any()  # some chunks span two documents
    with pytest.raises(ValueError, match="db_ids"):
        db.values([len(db)], 2 * M)
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkDatabase(train, 0)
    with pytest.raises(ValueError, match="fraction"):
        ChunkDatabase(train, M, fraction=1.5)


def test_a_fraction_keeps_only_whole_chunks_of_the_kept_documents(train):
    full, half = ChunkDatabase(train, M), ChunkDatabase(train, M, fraction=0.5, seed=3)
    doc = document_of_every_token(train)
    kept = set(half.kept_documents.tolist())
    assert len(kept) == round(0.5 * full.n_documents)
    starts = np.arange(len(full)) * M
    inside = np.array([all(d in kept for d in range(doc[s], doc[s + M - 1] + 1)) for s in starts])
    assert half.flat_ids.tolist() == np.flatnonzero(inside).tolist()  # all of them, only them
    for i in range(len(half)):  # values read the flat array at the mapped chunk
        assert (half.chunks([i])[0] == full.chunks([half.flat_ids[i]])[0]).all()
    other = ChunkDatabase(train, M, fraction=0.5, seed=4)
    assert set(other.kept_documents.tolist()) != kept and other.fingerprint != half.fingerprint


# ---- search -----------------------------------------------------------------------------
def test_bm25_scores_and_ranking_equal_a_hand_computed_bm25():
    import bm25s
    chunks = np.array([[1, 2, 3, 4, 5, 6], [1, 1, 2, 7, 8, 9], [3, 3, 3, 10, 11, 12],
                       [1, 13, 14, 15, 16, 17], [2, 3, 18, 19, 20, 21]])
    query = np.array([[1, 2, 3, 30, 31, 1]])  # 30, 31 are in no chunk; 1 counts once
    k1, n = 1.5, len(chunks)
    expected = np.zeros(n)
    for t in {1, 2, 3}:  # Lucene's BM25; every chunk has the average length, so b drops out
        df = sum(t in c for c in chunks.tolist())
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for d, c in enumerate(chunks.tolist()):
            tf = c.count(t)
            expected[d] += idf * tf / (tf + k1)
    index = BM25Index(chunks, vocab_size=32, dense_fraction=0.5)  # both the dense and sparse parts
    np.testing.assert_allclose(index.scores(query)[0], expected, rtol=1e-6)
    ranking = np.argsort(-expected, kind="stable")
    assert len(set(expected.round(6))) == n  # no ties: one right order
    nothing = np.zeros(1, np.int64)
    assert index.search(query, n, nothing, nothing)[0].tolist() == ranking.tolist()
    ref = bm25s.BM25()
    ref.index((chunks.tolist(), {i: i for i in range(32)}), show_progress=False)
    docs, _ = ref.retrieve([[1, 2, 3]], k=n, show_progress=False)
    assert docs[0].tolist() == ranking.tolist()


def test_faiss_exact_search_equals_brute_force_squared_l2_with_exclusions():
    rng = np.random.default_rng(0)
    keys, queries = rng.normal(size=(400, 16)), rng.normal(size=(50, 16))
    index = FaissIndex(keys, "flat")
    lo = rng.integers(0, 400, 50)
    hi = np.minimum(400, lo + rng.integers(0, 300, 50))
    got = index.search_keys(queries, 5, lo, hi)
    dist = ((queries[:, None, :] - keys[None]) ** 2).sum(-1)
    ids = np.arange(400)
    dist[(ids >= lo[:, None]) & (ids < hi[:, None])] = np.inf
    assert (got == np.argsort(dist, axis=1, kind="stable")[:, :5]).all()
    none = np.zeros(50, np.int64)
    assert (index.search_keys(queries, 3, none, none) ==
            np.argsort(((queries[:, None] - keys[None]) ** 2).sum(-1), axis=1)[:, :3]).all()


def test_ivfpq_refuses_too_few_training_vectors_bad_widths_and_bad_specs():
    with pytest.raises(ValueError, match=r"at least 9,984 training vectors, got 500.*39 vectors "
                                         r"per centroid.*Fix: fewer lists"):
        FaissIndex(np.zeros((500, 8), np.float32), "ivfpq:4:4")
    with pytest.raises(ValueError, match=r"at least 39,936 training vectors, got 20,000"):
        FaissIndex(np.zeros((20000, 8), np.float32), "ivfpq:1024:4")
    with pytest.raises(ValueError, match="sub-quantizers must divide"):
        FaissIndex(np.zeros((10000, 10), np.float32), "ivfpq:4:4")
    for bad in ("ivf:4", "ivfpq:0:4", "ivfpq:4", "hnsw", 3):
        with pytest.raises(ValueError, match=r"expected 'flat'.*'ivfpq:NLIST:M'"):
            parse_index_spec(bad)


def test_ivfpq_search_skips_excluded_ids_and_searches_deeper_when_needed():
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(39 * 256, 8)).astype(np.float32)
    index = FaissIndex(keys, "ivfpq:16:4")
    assert index.index.nprobe == 4  # sqrt(16)
    queries = keys[:20]
    none = np.zeros(20, np.int64)
    near = index.search_keys(queries, 3, none, none)
    assert (near[:, 0] == np.arange(20)).mean() > 0.8  # a vector finds itself (PQ is lossy)
    lo, hi = np.zeros(20, np.int64), np.full(20, 9900)  # all but 84 excluded: deep search
    far = index.search_keys(queries, 5, lo, hi)
    assert (far >= 9900).all() and all(len(set(row)) == 5 for row in far.tolist())
    hi[:] = len(keys) - 5  # 5 left, mostly in lists not probed: every list is searched
    last = index.search_keys(queries, 5, lo, hi)
    assert all(sorted(row) == list(range(len(keys) - 5, len(keys))) for row in last.tolist())
    assert index.index.nprobe == 4  # restored after probing every list


def test_bm25_retriever_refuses_an_index_spec_and_a_too_small_database(train):
    db = ChunkDatabase(train, M)
    with pytest.raises(ValueError, match="BM25 search is exact"):
        Retriever(db, "bm25", "ivfpq:4:4")
    with pytest.raises(ValueError, match="embedder_spec='tfidf' is invalid"):
        Retriever(db, "tfidf")
    retriever = Retriever(db, "bm25")
    with pytest.raises(ValueError, match="cannot supply k="):
        retriever.search(db.chunks([0]), k=3, exclude=(np.array([0]), np.array([10**6])))
    with pytest.raises(ValueError, match=r"query_chunks_QxM must be .*\[Q, 8\]"):
        retriever.search(np.zeros((2, 5), np.int32), k=1)


# ---- precomputed neighbours -----------------------------------------------------------------
def best_allowed_scores(retriever, dataset, k):
    """Brute force: each chunk's k best BM25 scores among chunks whose text and continuation
    stay outside every document of the query's training window."""
    db, doc = retriever.db, document_of_every_token(dataset)
    n, L = len(dataset) // M, len(dataset)
    queries = np.asarray(dataset.tokens[:n * M]).reshape(n, M)
    scores = retriever.index.scores(queries)
    window = np.arange(n) // (SEQ_LEN // M) * SEQ_LEN
    first, last = doc[window], doc[np.minimum(window + SEQ_LEN, L - 1)]
    same = touches(doc, db.flat_ids[None] * M, 2 * M, first[:, None], last[:, None])
    scores[same] = -np.inf
    return -np.sort(-scores, axis=1)[:, :k], scores, (first, last)


def test_training_neighbours_are_the_best_outside_the_window_documents(train):
    db = ChunkDatabase(train, M)
    retriever = Retriever(db, "bm25")
    nbrs = precompute_neighbours(retriever, train, k=3, seq_len=SEQ_LEN)
    assert nbrs.shape == (len(train) // M, 3) and nbrs.dtype == np.int32
    best, scores, (first, last) = best_allowed_scores(retriever, train, 3)
    got = np.take_along_axis(scores, nbrs.astype(np.int64), 1)
    assert np.isfinite(got).all()  # never a chunk of (or continuing into) the window's documents
    np.testing.assert_allclose(got, best, rtol=1e-6)  # and the best of the rest, best first
    doc = document_of_every_token(train)
    chunk = np.arange(len(nbrs))[:, None]
    start = db.flat_ids[nbrs] * M
    assert not touches(doc, start, 2 * M, first[:, None], last[:, None]).any()
    window = chunk // (SEQ_LEN // M) * SEQ_LEN
    assert not ((start < window + SEQ_LEN + 1) & (start + 2 * M > window)).any()  # not the window
    plain = retriever.search(np.asarray(train.tokens[:M * 40]).reshape(40, M), k=1)
    assert (plain[:, 0] != nbrs[:40, 0]).any()  # the exclusion changed something


def test_validation_neighbours_need_no_exclusion_and_exclusion_needs_the_same_split(train):
    valid = TokenDataset(toy_corpus(), ByteTokenizer(), split="validation", val_fraction=0.2)
    retriever = Retriever(ChunkDatabase(train, M), "bm25")
    with pytest.raises(ValueError, match="pass False"):
        precompute_neighbours(retriever, valid, k=2, seq_len=SEQ_LEN)
    nbrs = precompute_neighbours(retriever, valid, k=2, seq_len=SEQ_LEN,
                                 exclude_same_documents=False)
    queries = np.asarray(valid.tokens[:len(nbrs) * M]).reshape(-1, M)
    assert (nbrs == retriever.search(queries, 2)).all()
    with pytest.raises(ValueError, match="seq_len=36 must be a multiple of the chunk size M=8"):
        precompute_neighbours(retriever, train, k=2, seq_len=36)


def test_neighbours_are_a_pure_function_of_their_inputs(train, tmp_path, monkeypatch):
    first = np.array(precompute_neighbours(Retriever(ChunkDatabase(train, M)), train, 2, SEQ_LEN))
    monkeypatch.setenv("PALMLITE_CACHE", str(tmp_path / "another-cache"))
    again_data = TokenDataset(toy_corpus(), ByteTokenizer(), split="train", val_fraction=0.2)
    again = precompute_neighbours(Retriever(ChunkDatabase(again_data, M)), again_data, 2, SEQ_LEN)
    assert Path(again.filename).parent.parent == tmp_path / "another-cache"
    assert (np.asarray(again) == first).all()


def test_a_missing_truncated_or_damaged_cache_is_rebuilt_equal(train, capsys):
    retriever = Retriever(ChunkDatabase(train, M))
    compute = lambda: precompute_neighbours(retriever, train, k=2, seq_len=SEQ_LEN)
    nbrs = compute()
    path, original = Path(nbrs.filename), np.array(nbrs)
    assert "no cached neighbours" in capsys.readouterr().out
    assert path.parent.name == "retrieval" and path.with_suffix(".json").exists()
    del nbrs
    assert (np.asarray(compute()) == original).all() and capsys.readouterr().out == ""  # reused
    damages = {"wrong size": lambda b: b[:-4],
               "checksum": lambda b: bytes([b[0] ^ 0xFF]) + b[1:]}
    for reason, damage in damages.items():
        path.write_bytes(damage(path.read_bytes()))
        again = compute()
        assert reason in capsys.readouterr().out
        assert (np.asarray(again) == original).all()
    path.with_suffix(".json").unlink()
    assert (np.asarray(compute()) == original).all()
    assert "no cached neighbours" in capsys.readouterr().out


# ---- batches with neighbours ------------------------------------------------------------
def test_neighbour_batches_are_the_batches_plus_their_chunks_neighbour_values(train):
    db = ChunkDatabase(train, M)
    nbrs = precompute_neighbours(Retriever(db), train, k=2, seq_len=SEQ_LEN)
    batches = NeighbourBatches(train.batches(3, SEQ_LEN, seed=1), nbrs, db, length=2 * M)
    plain = train.batches(3, SEQ_LEN, seed=1)
    n_steps = plain.n_windows // 3 + 2  # into the second epoch
    with pytest.warns(RuntimeWarning, match="past one epoch"):
        for step in (0, 1, n_steps):
            out = batches.get(step)
            assert (out["tokens"] == plain.get(step)).all()
            assert out["neighbours"].shape == (3, SEQ_LEN // M, 2, 2 * M)
            for b, start in enumerate(plain.window_starts(step)):
                assert (out["tokens"][b] == train.tokens[start:start + SEQ_LEN + 1]).all()
                for j in range(SEQ_LEN // M):
                    assert (out["neighbours"][b, j] == db.values(nbrs[start // M + j], 2 * M)).all()
            again = NeighbourBatches(train.batches(3, SEQ_LEN, seed=1), nbrs, db, 2 * M)
            assert all((again.get(step)[key] == out[key]).all() for key in out)
            part = batches.get(step, rows=slice(1, 3))
            assert all((part[key] == out[key][1:3]).all() for key in out)
    assert batches.batch_size == 3 and batches.seq_len == SEQ_LEN and batches.dataset is train
    assert batches.epoch(n_steps) == plain.epoch(n_steps)
    with pytest.raises(ValueError, match=r"neighbours must be \["):
        NeighbourBatches(train.batches(3, SEQ_LEN), nbrs[:-1], db, 2 * M)


def test_neighbour_windows_follow_the_evaluation_windows(train):
    db = ChunkDatabase(train, M)
    nbrs = precompute_neighbours(Retriever(db), train, k=2, seq_len=SEQ_LEN)
    out = neighbour_windows(train, nbrs, db, SEQ_LEN, length=M, max_windows=5)
    assert (out["tokens"] == train.windows(SEQ_LEN, 5)).all()
    for w in range(5):
        for j in range(SEQ_LEN // M):
            assert (out["neighbours"][w, j] == db.values(nbrs[w * SEQ_LEN // M + j], M)).all()


def test_for_training_is_what_a_retro_run_reads(train):
    from palmlite.config import RetroConfig
    from palmlite.retro_data import for_training
    from palmlite.train_config import TrainConfig
    valid = TokenDataset(toy_corpus(), ByteTokenizer(), split="validation", val_fraction=0.2)
    retro = RetroConfig(chunk_size=M, n_neighbours=2)
    tc = TrainConfig(corpus="toy", tokenizer="bytes", batch_size=3, seq_len=SEQ_LEN,
                     eval_batches=2, val_fraction=0.2)
    data = for_training(retro, tc, train, valid)
    batches = data.batches(train.batches(3, SEQ_LEN))
    val_windows = data.windows(valid, SEQ_LEN, tc.eval_batches * tc.batch_size)
    assert (batches.get(4)["tokens"] == train.batches(3, SEQ_LEN).get(4)).all()
    assert batches.get(4)["neighbours"].shape == (3, SEQ_LEN // M, 2, 2 * M)
    record = data.to_dict()
    assert record["chunks"] == len(data.db) == len(train) // M and "bm25" in record["retriever"]
    assert {"database", "keys", "train neighbours", "validation neighbours"} <= set(data.seconds)
    assert (val_windows["tokens"] == valid.windows(SEQ_LEN, 6)).all()
    queries = val_windows["tokens"][:, :SEQ_LEN].reshape(-1, M)  # no exclusion: plain search
    expected = data.db.values(data.retriever.search(queries, 2), 2 * M)
    assert (val_windows["neighbours"] == expected.reshape(6, SEQ_LEN // M, 2, 2 * M)).all()
    half = for_training(retro, tc.replace(retrieval_db_fraction=0.5), train, valid)
    assert len(half.db) < len(data.db) and half.retriever.fingerprint != data.retriever.fingerprint


# ---- dense keys from a frozen run ------------------------------------------------------------
class OtherTokenizer(ByteTokenizer):
    name, fingerprint = "other-bytes", "f" * 64


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained run (bytes tokenizer, two steps): a frozen embedder."""
    from palmlite import ModelConfig
    from palmlite.train import train as train_run
    from palmlite.train_config import TrainConfig
    root = tmp_path_factory.mktemp("run")
    docs = root / "docs"
    docs.mkdir()
    for i, text in enumerate(toy_corpus().documents):
        (docs / f"{i:02d}.txt").write_text(text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PALMLITE_CACHE", str(root / "cache"))
        train_run(ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                              max_seq_len=32, vocab_size=259),
                  TrainConfig(corpus=str(docs), tokenizer="bytes", steps=2, batch_size=2,
                              seq_len=16, warmup_steps=1, log_every=1, eval_every=0,
                              eval_batches=1, checkpoint_every=0, steps_per_call=1, quiet=True,
                              val_fraction=0.2), out=root / "run")
    return root / "run"


def test_model_keys_are_mean_hidden_states_searched_exactly(train, run_dir):
    db = ChunkDatabase(train, M)
    retriever = Retriever(db, f"model:{run_dir}")
    chunks = db.chunks(np.arange(len(db)))
    model = retriever.embedder.model
    direct = np.asarray(model.hidden_states(chunks[:50]).mean(1))
    keys = retriever.index.keys_NxD
    np.testing.assert_allclose(keys[:50], direct, rtol=1e-4, atol=1e-5)
    nbrs = precompute_neighbours(retriever, train, k=2, seq_len=SEQ_LEN)
    doc = document_of_every_token(train)
    window = np.arange(len(nbrs)) // (SEQ_LEN // M) * SEQ_LEN
    first, last = doc[window], doc[np.minimum(window + SEQ_LEN, len(doc) - 1)]
    dist = ((keys[:len(nbrs), None] - keys[None]) ** 2).sum(-1)
    dist[touches(doc, db.flat_ids[None] * M, 2 * M, first[:, None], last[:, None])] = np.inf
    got = np.take_along_axis(dist, nbrs.astype(np.int64), 1)
    np.testing.assert_allclose(got, np.sort(dist, axis=1)[:, :2], rtol=1e-4, atol=1e-5)


def test_the_model_embedder_refuses_another_tokenizer(cache, run_dir):
    other = TokenDataset(toy_corpus(), OtherTokenizer(), split="train", val_fraction=0.2)
    with pytest.raises(ValueError, match=r"uses tokenizer 'bytes'.*uses 'other-bytes'"):
        ModelEmbedder(run_dir, other)
    with pytest.raises(ValueError, match="other-bytes"):
        Retriever(ChunkDatabase(other, M), f"model:{run_dir}")


# ---- leakage ---------------------------------------------------------------------------------
def brute_lcs(a, b) -> int:
    return max([n for i in range(len(a)) for j in range(len(b))
                for n in range(1, min(len(a) - i, len(b) - j) + 1)
                if list(a[i:i + n]) == list(b[j:j + n])], default=0)


def test_longest_common_substring_and_chunk_overlap_equal_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        a = rng.integers(0, 3, rng.integers(0, 12))
        b = rng.integers(0, 3, rng.integers(0, 15))
        assert longest_common_substring(a, b) == brute_lcs(a, b)
    assert longest_common_substring([5, 1, 2, 3, 9], [7, 1, 2, 3, 1, 2]) == 3
    chunks, values = rng.integers(0, 4, (6, 8)), rng.integers(0, 4, (6, 3, 16))
    values[2, 1, 4:12] = chunks[2]  # the whole chunk inside a neighbour: r(C) = 1
    expected = [max(brute_lcs(c, v) for v in vs) / 8 for c, vs in zip(chunks, values)]
    np.testing.assert_allclose(chunk_overlap(chunks, values), expected)
    assert chunk_overlap(chunks, values)[2] == 1.0
    a, b = rng.integers(0, 50, 64), rng.integers(0, 50, 128)
    b[30:45] = a[10:25]
    assert longest_common_substring(a, b) >= 15
    with pytest.raises(ValueError, match="chunks_QxM must be"):
        chunk_overlap(chunks, values[:3])
