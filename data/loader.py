"""
Deterministic, world-size independent loading of (x, y) windows from token shards.

Two layouts (config data.layout): `windows` (TokenLoader, below: independent, optionally
shuffled windows; the default) and `stream` (StreamLoader: the paper harness's in-order stream).

The rule: training data is a pure function of (files, seq_len, seed, step).

- Every shard is cut into non-overlapping windows of seq_len + 1 tokens
  (x = tokens[o:o+T], y = tokens[o+1:o+T+1], o = t*T); no window straddles two
  shards. The global window list is these windows, shard by shard, in sorted
  file order.
- Step s consumes the global sequence indices g = s*batch_size + j for j in
  [0, batch_size). Sequence g lives in epoch e = g // num_windows and reads
  window perm_e[g % num_windows], perm_e a seeded permutation of all windows.
- The global batch is then sliced into micro batches, first by micro step and
  then by rank. Which rank or accumulation step reads a sequence changes, but
  the set of sequences in a step never does: a 2-rank run sees exactly the
  data of a 1-rank run with 2 accumulation steps, and a run resumed at step s
  continues exactly where it stopped, with no loader state to checkpoint.
"""

import numpy as np
import torch

from data.shards import ShardError, find_shards, open_shard


def _describe(files):
    """Short name for a list of files in one-line error messages."""
    files = list(files)
    if not files:
        return "(no files)"
    return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more)"


def _epoch_seed(seed, epoch):
    # SeedSequence mixes (seed, epoch) into well-separated streams; a plain
    # seed + epoch would make run seed=1 epoch 0 replay run seed=0 epoch 1.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])


def micro_batch_size(batch_size, micro_step, grad_accum, rank, world_size):
    """Sequences per micro batch when a step's batch is split over ranks and accumulation steps;
    checks that (rank, micro_step) exists and the batch splits evenly."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if grad_accum < 1 or not 0 <= micro_step < grad_accum:
        raise ValueError(f"micro_step {micro_step} is not in [0, grad_accum={grad_accum})")
    if batch_size % (world_size * grad_accum) != 0:
        raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size} "
                         f"x grad_accum {grad_accum} = {world_size * grad_accum}")
    return batch_size // (world_size * grad_accum)


class TokenLoader:
    """Training windows over a list of shards, addressed by global sequence index."""

    def __init__(self, files, seq_len, seed=0, shuffle=True, vocab_size=None, pin=False):
        if isinstance(files, str):
            files = find_shards(files)
        self.files = sorted(files)
        if not self.files:
            raise ShardError("no shard files given to the loader")
        if seq_len < 1:
            raise ShardError(f"{_describe(self.files)}: seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.vocab_size = vocab_size
        self.pin = pin

        self.shards = [open_shard(f) for f in self.files]  # memmaps: cheap to hold all
        windows_per_shard = [max(len(s) - 1, 0) // seq_len for s in self.shards]
        # first_window[i] = global index of shard i's first window
        self.first_window = np.cumsum([0] + windows_per_shard)
        self.num_windows = int(self.first_window[-1])
        if self.num_windows == 0:
            longest = max(len(s) for s in self.shards)
            raise ShardError(f"{_describe(self.files)}: no training window fits: the longest shard holds "
                             f"{longest} tokens, a window needs seq_len+1={seq_len + 1}; "
                             f"use a smaller seq_len or more data")
        self._perms = {}  # epoch -> permutation; holds at most the last two epochs

    def _permutation(self, epoch):
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            # a batch may straddle an epoch boundary: keep the previous epoch too
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = torch.randperm(self.num_windows, generator=generator).numpy()
        return self._perms[epoch]

    def window_ids(self, global_indices):
        """Window index read by each global sequence index."""
        g = np.asarray(global_indices, dtype=np.int64).reshape(-1)
        if (g < 0).any():
            raise ValueError(f"global sequence indices must be >= 0, got {int(g.min())}")
        if not self.shuffle:
            return g % self.num_windows
        epochs, pos = np.divmod(g, self.num_windows)
        windows = np.empty_like(g)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            windows[mask] = self._permutation(int(epoch))[pos[mask]]
        return windows

    def windows(self, window_ids):
        """(x, y) int64 tensors of shape (len(window_ids), seq_len) for the given windows."""
        T = self.seq_len
        window_ids = np.asarray(window_ids, dtype=np.int64).reshape(-1)
        shard_of = np.searchsorted(self.first_window, window_ids, side="right") - 1
        buf = np.empty((len(window_ids), T + 1), dtype=np.uint16)
        for row, (w, s) in enumerate(zip(window_ids, shard_of)):
            offset = (w - self.first_window[s]) * T
            buf[row] = self.shards[s][offset:offset + T + 1]
        if self.vocab_size is not None and buf.size and int(buf.max()) >= self.vocab_size:
            row = int(np.argmax(buf.max(axis=1) >= self.vocab_size))
            bad = int(buf[row].max())
            s = shard_of[row]
            offset = (window_ids[row] - self.first_window[s]) * T
            raise ShardError(f"{self.files[s]}: token id {bad} >= vocab_size {self.vocab_size} "
                             f"(in the window at token offset {offset})")
        tokens = torch.from_numpy(buf.astype(np.int64))
        # contiguous: a pinned copy of a strided view would stage through an unpinned temporary
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        if self.pin and torch.cuda.is_available():
            # pinned host memory lets the caller's .to(device, non_blocking=True) overlap compute
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def sequences(self, global_indices):
        """(x, y) int64 tensors of shape (len, seq_len) for the given global sequence indices."""
        return self.windows(self.window_ids(global_indices))

    def micro_batch(self, step, batch_size, micro_step, grad_accum, rank, world_size):
        """This rank's share of micro step `micro_step` of step `step`'s global batch."""
        mb = micro_batch_size(batch_size, micro_step, grad_accum, rank, world_size)
        start = step * batch_size + (micro_step * world_size + rank) * mb
        return self.sequences(range(start, start + mb))


class StreamLoader:
    """The paper harness's data layout: one token stream, read in order.

    Step s reads the G = batch_size x seq_len tokens at position p_s of one shard, cut into
    batch_size consecutive seq_len-token sequences (targets shifted by one token); sequence k of
    the step covers tokens[p_s + k T : p_s + (k + 1) T + 1]. Rank r of W takes the r-th of W equal
    consecutive shares and splits it into its micro batches in order, as the paper's harness does,
    so the sequences of a step are the same for every number of ranks and accumulation steps.
    Position: a shard is read from its start in steps of G while p + G + 1 < len(shard) (the
    harness's rule, which leaves the tail of each shard unread), then the next shard, after the
    last the first again. Documents inside a sequence are told apart by the model (EOT tokens).
    """

    def __init__(self, files, seq_len, batch_size, vocab_size=None, pin=False):
        if isinstance(files, str):
            files = find_shards(files)
        self.files = sorted(files)
        if not self.files:
            raise ShardError("no shard files given to the loader")
        if seq_len < 1 or batch_size < 1:
            raise ShardError(f"{_describe(self.files)}: seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        self.seq_len, self.batch_size = seq_len, batch_size
        self.vocab_size, self.pin = vocab_size, pin
        self.shards = [open_shard(f) for f in self.files]
        G = batch_size * seq_len
        for path, shard in zip(self.files, self.shards):
            if len(shard) < G + 2:
                raise ShardError(f"{path}: holds {len(shard)} tokens, fewer than one step of the stream layout needs "
                                 f"(batch_size x seq_len + 2 = {G + 2}); use a smaller batch or seq_len, or larger shards")
        # steps read from each shard: positions 0, G, 2G, ... while p + G + 1 < len
        self.steps_per_shard = [(len(shard) - G - 2) // G + 1 for shard in self.shards]
        self.first_step = np.cumsum([0] + self.steps_per_shard)  # of each shard, within one pass

    def position(self, step):
        """(shard index, token offset) where step `step` starts reading."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        in_pass = step % int(self.first_step[-1])
        shard = int(np.searchsorted(self.first_step, in_pass, side="right")) - 1
        return shard, (in_pass - int(self.first_step[shard])) * self.batch_size * self.seq_len

    def micro_batch(self, step, batch_size, micro_step, grad_accum, rank, world_size):
        """(x, y) of shape (mb, seq_len): this rank's micro step `micro_step` of step `step`."""
        if batch_size != self.batch_size:
            raise ValueError(f"the stream loader was built for batch_size {self.batch_size}, got {batch_size}")
        mb = micro_batch_size(batch_size, micro_step, grad_accum, rank, world_size)
        first = rank * (batch_size // world_size) + micro_step * mb  # sequence index within the step
        shard, offset = self.position(step)
        T = self.seq_len
        start = offset + first * T
        buf = np.asarray(self.shards[shard][start:start + mb * T + 1], dtype=np.int64)
        if self.vocab_size is not None and int(buf.max()) >= self.vocab_size:
            raise ShardError(f"{self.files[shard]}: token id {int(buf.max())} >= vocab_size {self.vocab_size} "
                             f"(in the tokens from offset {start})")
        tokens = torch.from_numpy(buf)
        # contiguous copies: pinned memory then takes them without another staging copy
        x, y = tokens[:-1].view(mb, T).clone(), tokens[1:].view(mb, T).clone()
        if self.pin and torch.cuda.is_available():
            x, y = x.pin_memory(), y.pin_memory()
        return x, y


def val_sequences(files, seq_len, val_tokens, rank=0, world_size=1, batch_size=8, vocab_size=None, pin=False):
    """Iterator of (x, y) batches over the first val_tokens // seq_len windows of the val shards.

    Same windowing as training, never shuffled, so the val set is fixed. Rank r
    takes windows r, r + world_size, ... in batches of up to batch_size. Ranks
    can get one window more or less than others: sum loss * rows and rows on
    each rank and all-reduce both, rather than averaging per-batch means.
    Bad input raises here, not at the first next()."""
    pattern = files if isinstance(files, str) else None
    files = find_shards(files) if pattern else sorted(files)
    where = pattern or _describe(files)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    loader = TokenLoader(files, seq_len, shuffle=False, vocab_size=vocab_size, pin=pin)
    num_windows = val_tokens // seq_len
    held = sum(len(s) for s in loader.shards)
    if held < val_tokens + 1:
        raise ShardError(f"{where}: val shards hold {held} tokens, fewer than val_tokens={val_tokens} (+1)")
    if num_windows < 1:
        raise ShardError(f"{where}: val_tokens={val_tokens} is smaller than seq_len={seq_len}")
    if num_windows > loader.num_windows:
        raise ShardError(f"{where}: val shards hold {held} tokens but only {loader.num_windows} whole windows "
                         f"of seq_len+1={seq_len + 1} tokens, fewer than the {num_windows} that "
                         f"val_tokens={val_tokens} needs")
    mine = np.arange(rank, num_windows, world_size)

    def batches():
        for start in range(0, len(mine), batch_size):
            yield loader.windows(mine[start:start + batch_size])
    return batches()
