"""How a run ends, as the launcher, the worker and sweeps agree on it: the exit codes, and a
summary.json whose "status" says finished, stopped or failed (with a reason)."""

import errno
import os
import re
import sys

from worker.fileio import write_json

# Exit codes of run.py (and of a worker started without run.py). A worker started by run.py exits 0
# after a handled end (torchrun would print a ChildFailedError traceback, or restart it, for any
# other code); run.py then reads the outcome from summary.json.
EXIT_FAILED = 3  # the NaN guard, a full disk, an unusable checkpoint: "failed" in summary.json
EXIT_STOPPED = 75  # a graceful stop (SIGTERM/SIGINT): "stopped" in summary.json, resumable (EX_TEMPFAIL)

# errors of a full or size-limited disk: the run fails with one line, older checkpoints kept
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


# What a collective's error says when a peer rank stopped answering (gloo: "Timed out waiting 5000ms for
# recv operation to complete"; NCCL's watchdog: "Watchdog caught collective operation timeout") or is
# gone (gloo: "Connection closed by peer", "Connection reset by peer")
COLLECTIVE_TIMED_OUT = re.compile(r"timed out waiting|collective operation timeout", re.IGNORECASE)
PEER_LOST = re.compile(r"connection (closed|reset) by peer|broken pipe", re.IGNORECASE)
# statuses of summary.json that end a run as a failure (exit code 3): "diverged" is a failure too
FAILED_STATUSES = ("failed", "diverged")


def collective_failure(message: str) -> str | None:
    """'timeout' or 'lost' if `message` (an error of a collective) says a peer rank stopped answering
    or is gone; None for anything else."""
    if COLLECTIVE_TIMED_OUT.search(message):
        return "timeout"
    if PEER_LOST.search(message):
        return "lost"
    return None


class RunFailed(Exception):
    """A run that cannot go on (a full disk, an unusable checkpoint): one line, "failed" in summary.json."""


def launched_by_run_py() -> bool:
    return bool(os.environ.get("MOFA_LAUNCHER_PID"))


def exit_process(code: int) -> None:
    """Exits without the interpreter's teardown (train_gpt.main says why); 0 under run.py, which
    reports the outcome itself."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if launched_by_run_py() else code)


def write_summary_quietly(run_dir: str, summary: dict) -> bool:
    """summary.json if it can be written (a full disk may not let it)."""
    try:
        write_json(os.path.join(run_dir, "summary.json"), summary)
        return True
    except OSError:
        return False
