import hashlib
import http.server
import sys
import threading

import pytest

from palmlite import corpora
from palmlite.corpora import Corpus, Download, load_corpus


def test_pystdlib_is_real_deterministic_code_without_tests():
    corpus = load_corpus("pystdlib")
    assert corpus.n_bytes > 5_000_000 and len(corpus.documents) > 300
    files = corpora.pystdlib_files()
    assert all("test" not in p.parts[:-1] and "site-packages" not in p.parts for p in files)
    assert not any(p.name.startswith("test_") for p in files)
    assert any(p.name == "argparse.py" for p in files)
    assert load_corpus("pystdlib").fingerprint == corpus.fingerprint


def test_pydocs_is_english_prose():
    corpus = load_corpus("pydocs")
    assert corpus.n_bytes > 100_000 and "the" in corpus.documents[0]


def test_local_file_directory_and_glob(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\r\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / ".hidden").write_text("secret")
    assert load_corpus(tmp_path / "a.txt").documents == ("alpha\r\n",)  # bytes kept as they are
    assert load_corpus(str(tmp_path)).documents == ("alpha\r\n", "beta")
    assert load_corpus(str(tmp_path / "**" / "*.md")).documents == ("beta",)


def test_missing_path_names_it():
    with pytest.raises(FileNotFoundError, match="no/such/file.txt"):
        load_corpus("no/such/file.txt")


def test_empty_and_undecodable_corpora(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt.*UTF-8"):
        load_corpus(tmp_path / "latin1.txt")


def test_fingerprint_depends_on_document_boundaries():
    assert Corpus("x", ("ab", "c")).fingerprint != Corpus("x", ("a", "bc")).fingerprint


# ---- downloads against a local HTTP server (tests never touch the internet) ------------
PAYLOAD = b"To be, or not to be, that is the question.\n" * 100


@pytest.fixture
def server():
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", hits
    httpd.shutdown()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PALMLITE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_download_once_verified_then_cached(server, monkeypatch, cache):
    url, hits = server
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    monkeypatch.setitem(corpora.DOWNLOADS, "shake", Download(f"{url}/shake.txt", sha))
    assert load_corpus("shake").documents == (PAYLOAD.decode(),)
    assert load_corpus("shake").documents == (PAYLOAD.decode(),)
    assert len(hits) == 1  # the second load came from the cache
    assert (cache / "downloads" / "shake.txt").read_bytes() == PAYLOAD


def test_checksum_mismatch_deletes_the_file_and_raises(server, monkeypatch, cache):
    url, _ = server
    monkeypatch.setitem(corpora.DOWNLOADS, "shake", Download(f"{url}/shake.txt", "0" * 64))
    with pytest.raises(ValueError, match="sha256"):
        load_corpus("shake")
    assert list((cache / "downloads").iterdir()) == []  # no partial or bad file left


def test_server_down_names_offline_alternatives(monkeypatch, cache):
    monkeypatch.setitem(corpora.DOWNLOADS, "shake",
                        Download("http://127.0.0.1:9/shake.txt", "0" * 64))
    with pytest.raises(ConnectionError, match="pystdlib"):
        load_corpus("shake")
    assert list((cache / "downloads").iterdir()) == []


def test_hugging_face_without_datasets_gives_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_corpus("tinystories")


def test_arithmetic_corpus_options_from_its_name():
    from palmlite import arithmetic
    default = load_corpus("arithmetic", n=10)
    assert default.documents == tuple(p.text for p in arithmetic.problems(10))
    corpus = load_corpus("arithmetic:n=10,max_digits=2,operators=+,lines=4")
    lines = [p.text for p in arithmetic.problems(10, max_digits=2, operators="+")]
    assert corpus.name == "arithmetic:n=10,max_digits=2,operators=+,lines=4"
    assert corpus.documents == ("\n".join(lines[:4]), "\n".join(lines[4:8]), "\n".join(lines[8:]))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['digits'\]"):
        load_corpus("arithmetic:digits=3")
    with pytest.raises(ValueError, match="lines=0"):
        load_corpus("arithmetic:lines=0")
