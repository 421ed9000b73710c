"""
FineWeb shards: download the pre-tokenised FineWeb-10B GPT-2 shards, or
tokenise raw text (yours, or FineWeb parquet files) into the same format.

    python -m data.fineweb download --num-shards 8 [--out data/fineweb10B] [--repo-id kjj0/fineweb10B-gpt2]
    python -m data.fineweb tokenize --input 'raw/*.jsonl' --out data/mytext [--workers 4] [--val-fraction 0.01 | --val-docs N]

Both write fineweb_val_000000.bin plus fineweb_train_000001.bin, 000002, ...
(100M tokens each), so the same globs work for downloaded and home-made shards.
"""

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from data.shards import ShardError, read_header, write_shard
from data.tokenizer import EOT_TOKEN

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "data", "fineweb10B")
DEFAULT_REPO = "kjj0/fineweb10B-gpt2"
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_FRACTION = 0.01  # of the documents, for the val shard (at least one; at least one left for train)


def shard_name(split, index, prefix="fineweb"):
    return f"{prefix}_{split}_{index:06d}.bin"


# -----------------------------------------------------------------------------
# download

def _is_complete(path):
    try:
        read_header(path)
        return True
    except ShardError:
        return False


def download(num_shards, out_dir=DEFAULT_OUT, repo_id=DEFAULT_REPO, endpoint=None, revision=None):
    """Download the val shard and train shards 1..num_shards into out_dir; return their paths.

    Resumable: a file already there with a valid header and size is skipped
    without touching the network, a broken one is fetched again, and
    huggingface_hub resumes a partial download from its .incomplete file.
    endpoint overrides HF_ENDPOINT (huggingface_hub reads that at import)."""
    from huggingface_hub import hf_hub_download
    from tqdm import tqdm

    if num_shards < 0:
        raise ShardError(f"{repo_id}: --num-shards must be >= 0, got {num_shards}")
    names = [shard_name("val", 0)] + [shard_name("train", i) for i in range(1, num_shards + 1)]
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name in tqdm(names, desc=f"{repo_id} shards", unit="file"):
        path = os.path.join(out_dir, name)
        paths.append(path)
        if _is_complete(path):
            continue
        broken = os.path.exists(path)
        if broken:
            os.remove(path)  # its download metadata would make huggingface_hub keep it as is
        try:
            hf_hub_download(repo_id=repo_id, filename=name, repo_type="dataset", revision=revision,
                            local_dir=out_dir, endpoint=endpoint, force_download=broken)
        except Exception as e:  # network, 404, auth...: one line for the launcher
            reason = (str(e).strip().splitlines() or [""])[0]
            raise ShardError(f"{repo_id}/{name}: download failed: {type(e).__name__}: {reason}") from None
        read_header(path)  # a server can send a complete but wrong file
    return paths


# -----------------------------------------------------------------------------
# tokenize

def _input_files(inputs):
    """Files from paths and globs, in sorted order; unknown extensions are an error."""
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    files = []
    for item in inputs:
        matches = sorted(glob.glob(os.path.expanduser(item)))
        if not matches:
            raise ShardError(f"{item}: no input file matches")
        files.extend(matches)
    for f in files:
        if not f.endswith((".txt", ".jsonl", ".parquet")):
            raise ShardError(f"{f}: unsupported input type; use .txt (one document), "
                             f".jsonl (a 'text' field per line) or .parquet (a 'text' column)")
    if any(f.endswith(".parquet") for f in files):
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            first = next(f for f in files if f.endswith(".parquet"))
            raise ShardError(f"{first}: reading .parquet needs pyarrow: pip install pyarrow") from None
    return files


def iter_documents(files):
    """Yield the text of every document, file by file, in order."""
    for path in files:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                yield f.read()
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ShardError(f"{path}:{lineno}: not a JSON object with a 'text' field "
                                         f"({type(e).__name__})") from None
                    if not isinstance(text, str):
                        raise ShardError(f"{path}:{lineno}: 'text' is {type(text).__name__}, not a string")
                    yield text
        else:
            import pyarrow.parquet as pq
            parquet = pq.ParquetFile(path)
            if "text" not in parquet.schema_arrow.names:
                raise ShardError(f"{path}: parquet file has no 'text' column")
            for batch in parquet.iter_batches(columns=["text"], batch_size=1024):
                yield from (t for t in batch.column(0).to_pylist() if t is not None)


def tokenize_document(text):
    """eot followed by the document's GPT-2 tokens (the eot marks each document start)."""
    from data.tokenizer import gpt2_encoding
    tokens = [EOT_TOKEN] + gpt2_encoding().encode_ordinary(text)
    return np.array(tokens, dtype=np.uint16)


@dataclass
class Tokenized:
    paths: list  # the val shard, then the train shards
    val_docs: int
    train_docs: int


def count_documents(files) -> int:
    """Non-empty documents of the inputs (a first, cheap pass: no tokenizing)."""
    return sum(1 for d in iter_documents(files) if d)


def tokenize(inputs, out_dir, shard_tokens=DEFAULT_SHARD_TOKENS, workers=1, val_docs=None,
             prefix="fineweb", val_fraction=DEFAULT_VAL_FRACTION):
    """Tokenise the documents of `inputs` (paths or globs, in the order given,
    each glob's matches sorted) into {prefix}_val_000000.bin (the first val_docs
    documents; by default val_fraction of them, at least one) and
    {prefix}_train_000001.bin, ... of at most shard_tokens tokens each (documents
    continue across train shard boundaries). At least one document is left for
    training. Output does not depend on workers: documents come back in input
    order. Returns the paths and the document counts of the split."""
    from tqdm import tqdm

    files = _input_files(inputs)
    if shard_tokens < 1 or workers < 1 or (val_docs is not None and val_docs < 0) or not 0 < val_fraction < 1:
        raise ShardError(f"{out_dir}: need shard_tokens >= 1, workers >= 1, val_docs >= 0, 0 < val_fraction < 1 "
                         f"(got {shard_tokens}, {workers}, {val_docs}, {val_fraction})")
    total = count_documents(files)
    if val_docs is None:
        val_docs = min(max(1, round(val_fraction * total)), total - 1)
    if total <= val_docs:
        how = f"--val-docs {val_docs}" if val_docs else "--val-docs"
        raise ShardError(f"{files[0]}: only {total} non-empty documents in the input, all of them val ({how}); "
                         "no train tokens: give more documents or a smaller --val-docs / --val-fraction")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    val_parts, ndocs = [], 0
    train_buf, train_fill, train_index = np.empty(shard_tokens, dtype=np.uint16), 0, 1

    def flush_train():
        nonlocal train_fill, train_index
        path = os.path.join(out_dir, shard_name("train", train_index, prefix))
        write_shard(path, train_buf[:train_fill])
        written.append(path)
        train_fill, train_index = 0, train_index + 1

    documents = (d for d in iter_documents(files) if d)  # an empty document teaches nothing
    pool = None
    if workers > 1:
        import multiprocessing
        pool = multiprocessing.Pool(workers)
        token_arrays = pool.imap(tokenize_document, documents, chunksize=16)  # imap keeps input order
    else:
        token_arrays = map(tokenize_document, documents)
    try:
        for tokens in tqdm(token_arrays, desc="tokenizing", unit="doc", total=total):
            ndocs += 1
            if ndocs <= val_docs:
                val_parts.append(tokens)
                continue
            while len(tokens):
                take = min(len(tokens), shard_tokens - train_fill)
                train_buf[train_fill:train_fill + take] = tokens[:take]
                train_fill, tokens = train_fill + take, tokens[take:]
                if train_fill == shard_tokens:
                    flush_train()
    finally:
        if pool is not None:
            pool.terminate()  # every result is consumed, or we are failing: stop the workers now
    if train_fill:
        flush_train()
    val_path = os.path.join(out_dir, shard_name("val", 0, prefix))
    write_shard(val_path, np.concatenate(val_parts) if val_parts else np.zeros(0, np.uint16))
    return Tokenized([val_path] + written, val_docs, ndocs - val_docs)


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Download or build FineWeb-format GPT-2 token shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    dl = commands.add_parser("download", help="download pre-tokenised FineWeb-10B shards")
    dl.add_argument("--num-shards", type=int, required=True, help="train shards of 100M tokens (1..103)")
    dl.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    dl.add_argument("--repo-id", default=DEFAULT_REPO, help="HF dataset repo (default: %(default)s)")
    dl.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    dl.add_argument("--endpoint", default=None, help="hub URL (default: $HF_ENDPOINT or huggingface.co)")
    tok = commands.add_parser("tokenize", help="tokenise .txt/.jsonl/.parquet documents into shards")
    tok.add_argument("--input", nargs="+", required=True, help="files or globs (quote globs)")
    tok.add_argument("--out", required=True, help="output directory")
    tok.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per train shard (default: %(default)s)")
    tok.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="tokenizer processes (default: %(default)s, the cores less one)")
    val = tok.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                     help="this fraction of the documents (the first ones; at least one, and one is always left for "
                          "train) form the val shard (default: %(default)s)")
    val.add_argument("--val-docs", type=int, default=None, help="instead of --val-fraction: exactly the first N documents form the val shard")
    tok.add_argument("--prefix", default="fineweb", help="shard file prefix (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            paths = download(args.num_shards, args.out, args.repo_id, endpoint=args.endpoint, revision=args.revision)
        else:
            done = tokenize(args.input, args.out, args.shard_tokens, args.workers, args.val_docs, args.prefix,
                            args.val_fraction)
            val_tokens, train_tokens = read_header(done.paths[0]), sum(read_header(p) for p in done.paths[1:])
            print(f"{args.out}: val {done.val_docs:,} documents, {val_tokens:,} tokens (1 shard); train "
                  f"{done.train_docs:,} documents, {train_tokens:,} tokens ({len(done.paths) - 1} shards)")
            return 0
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = sum(read_header(p) for p in paths)
    print(f"{args.out}: {len(paths)} shards, {total:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
