"""Atomic file writes: the one way the harness writes a file that must never be seen half-written.

The content goes to a temp file beside the target (`NAME.tmp.PID`), is flushed and fsynced, then
renamed over the target, and the directory is fsynced so the rename itself survives a crash. A
failure (a full disk, a kill) leaves the old file whole and no temp file behind.

Used for config.json, summary.json, env.json, a resumed metrics.jsonl, checkpoints (torch.save),
token shards and the corpus manifest.
"""

import errno
import json
import os
from typing import IO, Callable


def write_atomic(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
    """Calls `write(file)` on a temp file, then puts the file at `path` in one rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def fsync_directory(directory: str) -> None:
    """Makes a rename in `directory` durable. Filesystems that cannot fsync a directory say EINVAL
    (or the platform cannot open one): nothing more can be done there."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    write_atomic(path, lambda f: f.write(text))


def write_json(path: str, obj, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def append_json_line(path: str, obj) -> None:
    """Appends one JSON line to `path` and makes it durable (a log that only grows)."""
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def keep_lines_up_to(path: str, step: int) -> None:
    """A resume's JSON-lines log (spectrum.jsonl, ranks.jsonl): the lines up to the checkpoint's
    step, rewritten atomically (the later ones are redone); a line a kill cut short is dropped."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    write_text_atomic(path, "".join(kept))


def start_json_log(path: str, start_step: int) -> None:
    """A JSON-lines log at a run's start: a resume from step `start_step` keeps the lines up to it
    (the later ones are logged again), a fresh start (0) begins a new file."""
    if start_step:
        keep_lines_up_to(path, start_step)
    elif os.path.exists(path):
        os.remove(path)
