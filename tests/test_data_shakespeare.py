"""The download helper and the two Shakespeare preparers, against a local HTTP server the test starts."""

from __future__ import annotations

import http.server
import pickle
import random
import re
import socket
import threading
import time

import numpy as np
import pytest

from nanogpt.data import shakespeare, shakespeare_char
from nanogpt.data.common import DataError
from nanogpt.data.download import DownloadError, download
from nanogpt.data.shards import find_split, open_tokens
from nanogpt.data.tokenizer import load_tokenizer
from tests.data_gpt2_files import write_gpt2_files


@pytest.fixture
def text():
    seed = random.SystemRandom().randrange(2**32)
    print(f"random seed {seed}")
    rand = random.Random(seed)
    words = "ROMEO: JULIET: thou art the sun and moon, what light through yonder window breaks? I'll be".split()
    lines = [" ".join(rand.choice(words) for _ in range(rand.randint(1, 10))) for _ in range(400)]
    return "\n".join(lines) + "\nFirst Citizen: ÿ—done.\n"


class Server:
    """A local HTTP server: GET /<name> answers what `routes[name]` says; counts the requests."""

    def __init__(self):
        self.routes: dict[str, list] = {}  # name -> list of (status, body, content_length) answers, the last repeats
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append(name)
                answers = server.routes.get(name, [(404, b"not here", None)])
                status, body, length = answers.pop(0) if len(answers) > 1 else answers[0]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server():
    running = Server()
    yield running
    running.close()


@pytest.fixture
def dead_url():
    """A URL on a 127.0.0.1 port where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"


# -- download ---------------------------------------------------------------------------------------

def test_download_fetches_the_bytes(server, tmp_path, text):
    body = text.encode()
    server.routes["input.txt"] = [(200, body, None)]
    dest = download(f"{server.url}/input.txt", tmp_path / "sub" / "input.txt")
    assert dest.read_bytes() == body
    assert sorted(p.name for p in dest.parent.iterdir()) == ["input.txt"]  # no .part left


def test_download_retries_server_errors(server, tmp_path):
    server.routes["flaky"] = [(503, b"busy", None), (200, b"finally", None)]
    dest = download(f"{server.url}/flaky", tmp_path / "flaky", retries=2, backoff_s=0.01)
    assert dest.read_bytes() == b"finally" and server.requests == ["flaky", "flaky"]


def test_download_404_fails_at_once_naming_the_url(server, tmp_path):
    url = f"{server.url}/missing.txt"
    with pytest.raises(DownloadError, match=re.escape(url) + ".*404"):
        download(url, tmp_path / "x", retries=3, backoff_s=5)
    assert server.requests == ["missing.txt"] and not list(tmp_path.iterdir())


def test_download_truncated_body_keeps_the_old_file(server, tmp_path):
    server.routes["short"] = [(200, b"only part", 1000)]  # promises 1000 bytes, sends 9
    dest = tmp_path / "input.txt"
    dest.write_text("earlier complete copy")
    url = f"{server.url}/short"
    with pytest.raises(DownloadError, match=re.escape(url) + ".*2 attempt"):
        download(url, dest, retries=2, backoff_s=0.01, timeout_s=5)
    assert dest.read_text() == "earlier complete copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt"]


def test_download_unreachable_url_is_named(dead_url, tmp_path):
    started = time.monotonic()
    with pytest.raises(DownloadError, match=re.escape(dead_url) + ".*failed after 2 attempt"):
        download(dead_url, tmp_path / "input.txt", retries=2, backoff_s=0.01, timeout_s=5)
    assert time.monotonic() - started < 5
    with pytest.raises(DownloadError, match="ftp://example/x: not an http"):
        download("ftp://example/x", tmp_path / "y")


# -- shakespeare_char -------------------------------------------------------------------------------

def check_char_output(out, text):
    meta = pickle.loads((out / "meta.pkl").read_bytes())
    chars = sorted(set(text))
    assert meta["vocab_size"] == len(chars)
    assert meta["itos"] == dict(enumerate(chars)) and meta["stoi"] == {c: i for i, c in enumerate(chars)}
    cut = int(len(text) * 0.9)
    train = np.fromfile(out / "train.bin", dtype="<u2")
    val = np.fromfile(out / "val.bin", dtype="<u2")
    assert train.size == cut and val.size == len(text) - cut
    assert "".join(chars[i] for i in train) == text[:cut] and "".join(chars[i] for i in val) == text[cut:]
    tokenizer = load_tokenizer(out)  # what sampling and training will use
    assert tokenizer.name == "char" and tokenizer.eot_id is None and tokenizer.decode(train.tolist()) == text[:cut]
    assert [p.name for p in find_split(out, "val")] == ["val.bin"]
    np.testing.assert_array_equal(open_tokens(out / "val.bin"), val)


def test_shakespeare_char_downloads_and_writes_nanogpt_files(server, tmp_path, text, monkeypatch):
    server.routes["input.txt"] = [(200, text.encode(), None)]
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    result = shakespeare_char.main(["--url", f"{server.url}/input.txt"])
    out = tmp_path / "data" / "shakespeare_char"
    assert (out / "input.txt").read_text() == text
    check_char_output(out, text)
    assert result["vocab_size"] == len(set(text))
    # A rerun uses the kept input.txt: the server is not asked again.
    shakespeare_char.main(["--url", f"{server.url}/input.txt"])
    assert server.requests == ["input.txt"]


def test_shakespeare_char_from_local_input(tmp_path, text):
    source = tmp_path / "my_text.txt"
    source.write_text(text)
    out = tmp_path / "out"
    shakespeare_char.main(["--input", str(source), "--out", str(out)])
    check_char_output(out, text)
    assert not (out / "input.txt").exists()


def test_shakespeare_char_unreachable_url(dead_url, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match=re.escape(dead_url)):
        shakespeare_char.main(["--url", dead_url, "--out", str(out), "--retries", "1"])
    assert not (out / "train.bin").exists() and not (out / "input.txt").exists()


def test_shakespeare_refuses_folders_whose_vocabulary_would_win(tmp_path, text):
    source = tmp_path / "input.txt"
    source.write_text(text)
    out = tmp_path / "out"
    out.mkdir()
    (out / "corpus.json").write_text("{}")
    with pytest.raises(DataError, match=re.escape(str(out / "corpus.json"))):
        shakespeare_char.main(["--input", str(source), "--out", str(out)])
    (out / "corpus.json").unlink()
    (out / "meta.pkl").write_bytes(b"from shakespeare_char")
    with pytest.raises(DataError, match=re.escape(str(out / "meta.pkl"))):
        shakespeare.main(["--input", str(source), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["meta.pkl"]


def test_shakespeare_bad_inputs(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "absent.txt")) + ".*not found"):
        shakespeare_char.main(["--input", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "out")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "empty.txt")) + ".*empty"):
        shakespeare_char.main(["--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "out")])
    with pytest.raises(DataError, match="--val_fraction 1.5"):
        shakespeare_char.main(["--input", str(tmp_path / "empty.txt"), "--val_fraction", "1.5", "--out", str(tmp_path / "o")])


# -- shakespeare (GPT-2) ----------------------------------------------------------------------------

def test_shakespeare_gpt2_tokens(server, tmp_path, text, monkeypatch):
    write_gpt2_files(tmp_path / "gpt2_files")
    monkeypatch.setenv("NANOGPT_GPT2_TOKENIZER_DIR", str(tmp_path / "gpt2_files"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken_cache"))
    server.routes["input.txt"] = [(200, text.encode(), None)]
    out = tmp_path / "out"
    counts = shakespeare.main(["--url", f"{server.url}/input.txt", "--out", str(out)])
    tokenizer = load_tokenizer(out)  # no meta.pkl: GPT-2
    assert tokenizer.name == "gpt2" and not (out / "meta.pkl").exists()
    cut = int(len(text) * 0.9)
    train = np.fromfile(out / "train.bin", dtype="<u2")
    val = np.fromfile(out / "val.bin", dtype="<u2")
    assert (train.size, val.size) == (counts["train"], counts["val"])
    assert tokenizer.decode(train.tolist()) == text[:cut] and tokenizer.decode(val.tolist()) == text[cut:]
    assert train.size < cut  # merges shortened it: GPT-2 tokens, not characters


def test_shakespeare_gpt2_unavailable_suggests_char_before_downloading(server, tmp_path, monkeypatch):
    monkeypatch.delenv("NANOGPT_GPT2_TOKENIZER_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("NANOGPT_GPT2_DOWNLOAD_TIMEOUT", "20")
    server.routes["input.txt"] = [(200, b"text", None)]
    try:
        shakespeare.main(["--url", f"{server.url}/input.txt", "--out", str(tmp_path / "out")])
    except DataError as e:
        assert "nanogpt.data.shakespeare_char" in str(e)
    else:
        pytest.skip("GPT-2's files could be downloaded here")
    assert server.requests == [] and not (tmp_path / "out").exists()
