"""
Token shards on disk, in the format used by llm.c and modded-nanogpt:

    header: 256 x int32 little endian
        [0] magic   20240520
        [1] version 1
        [2] number of tokens in the file
    body:   ntokens x uint16 little endian (GPT-2 ids fit in 16 bits)

So a valid file is exactly 1024 + 2 * ntokens bytes long, which lets us catch a
truncated download or an interrupted write from the size alone.
"""

import glob
import os

import numpy as np

from worker.fileio import write_atomic

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")


class ShardError(ValueError):
    """Bad data input. The message is one line naming the file and the problem;
    the launcher prints it without a traceback."""


def write_shard(path, tokens):
    """Write `tokens` (any int array-like) as a shard at `path`, atomically
    (fileio.write_atomic): a crash never leaves a half-written shard behind
    under the real name."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ShardError(f"{path}: tokens must be a 1-D array, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ShardError(f"{path}: token ids must fit in uint16 (0..65535), "
                         f"got range {int(tokens.min())}..{int(tokens.max())}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(f):
        f.write(header.tobytes())
        f.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())

    write_atomic(path, write, binary=True)


def read_header(path):
    """Validate the shard at `path` and return its number of tokens."""
    if not os.path.isfile(path):
        raise ShardError(f"{path}: shard file not found")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: corrupt header: file is {size} bytes, "
                         f"smaller than the {HEADER_BYTES}-byte header")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    if header[0] != MAGIC:
        raise ShardError(f"{path}: wrong magic number {int(header[0])} "
                         f"(expected {MAGIC}); not a token shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {int(header[1])} (expected {VERSION})")
    ntokens = int(header[2])
    if ntokens < 0:
        raise ShardError(f"{path}: corrupt header: negative token count {ntokens}")
    expected = HEADER_BYTES + 2 * ntokens
    if size != expected:
        problem = "truncated" if size < expected else "has trailing bytes"
        raise ShardError(f"{path}: file {problem}: {size} bytes, header says "
                         f"{ntokens} tokens = {expected} bytes")
    return ntokens


def open_shard(path):
    """Validate and memory-map a shard's tokens (read-only uint16 array).

    A memmap keeps resident memory flat no matter how big the corpus is: only
    the pages a batch touches are read from disk."""
    ntokens = read_header(path)
    if ntokens == 0:
        # np.memmap refuses zero-length maps
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(ntokens,))


def find_shards(pattern):
    """Sorted list of files matching a glob pattern (or a list of patterns/files)."""
    patterns = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    files = sorted({f for p in patterns for f in glob.glob(os.path.expanduser(str(p)))})
    if not files:
        shown = patterns[0] if len(patterns) == 1 else patterns
        raise ShardError(f"no shards match {shown}{how_to_build(patterns)}")
    return files


def how_to_build(patterns) -> str:
    """Where the project's own corpora come from, for a missing-shards error: '' for other data."""
    text = " ".join(str(p) for p in patterns)
    if "shakespeare" in text:
        return "; build the embedded default corpus with `make data` (python -m data.build_default)"
    if "fineweb10B" in text:
        return "; download FineWeb's GPT-2 shards with `python -m data.fineweb download --num-shards 8`"
    return ""
