"""One owner per run folder at a time, and no trainer outliving its launcher (Linux).

Two lock files in results/RUN, both taken with fcntl.flock, so the kernel releases them when their
holders die, however they die:

- `.lock` (`.lock.nodeK` for node rank K > 0): held exclusively by the launcher that claims the
  folder (a fresh launch, a resume, an overwrite, a sweep's run) for as long as its workers run; it
  is inherited by torchrun, so a launcher killed with SIGKILL keeps the folder claimed until its
  torchrun has stopped the workers. A second claimant gets one line naming the holder (the file
  holds the holder's pid, host and command line).
- `.workers.lock` (`.workers.lock.nodeK`): held shared by every training worker of the node. A
  claimant also needs it exclusively for a moment, so no launch starts while workers of an
  earlier one (e.g. orphans of a killed launcher) still train into the folder.

Workers die with their parents: torchrun gets SIGTERM when the launcher dies (it then stops the
workers, which write a stop checkpoint), a worker gets SIGKILL when torchrun dies
(prctl PR_SET_PDEATHSIG).
"""

import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time

OWNER_LOCK = ".lock"
WORKERS_LOCK = ".workers.lock"
LAUNCHER_ENV = "MOFA_LAUNCHER_PID"  # set by run.py for its workers
NODE_RANK_ENV = "MOFA_NODE_RANK"  # run.py's --node-rank, whose lock files the node's workers hold
LOCK_FILES = (OWNER_LOCK, WORKERS_LOCK)


class RunLockError(ValueError):
    """The run folder is owned by another process; one line naming it."""


def lock_path(run_dir: str, kind: str, node_rank: int = 0) -> str:
    return os.path.join(run_dir, kind if node_rank == 0 else f"{kind}.node{node_rank}")


def is_lock_file(name: str) -> bool:
    return any(name == kind or name.startswith(kind + ".node") for kind in LOCK_FILES)


def _proc_lock_pids(path: str) -> list[int]:
    """Pids holding a lock on `path`, from /proc/locks (Linux; [] elsewhere)."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->":
            continue
        try:
            if int(parts[5].rsplit(":", 1)[1]) == inode:
                pids.append(int(parts[4]))
        except (ValueError, IndexError):
            continue
    return sorted(set(pids))


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def describe_holder(path: str) -> str:
    """Who holds the lock `path`: what the holder wrote into it, else the pids in /proc/locks."""
    try:
        with open(path, "rb") as f:
            info = json.loads(f.read(65536).decode("utf-8"))
        if isinstance(info, dict) and "pid" in info:
            return f"pid {info['pid']} on {info.get('host', '?')} ({str(info.get('command', ''))[:200]})"
    except (OSError, ValueError):
        pass
    pids = _proc_lock_pids(path)
    if pids:
        return ", ".join(f"pid {pid}" + (f" ({_cmdline(pid)[:200]})" if _cmdline(pid) else "") for pid in pids)
    return "another process"


def _try_lock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def claim(run_dir: str, node_rank: int = 0) -> int:
    """Takes the run folder (which must exist): returns the fd that holds its owner lock (keep it
    open for as long as the run is yours), or raises RunLockError naming the holder."""
    name = os.path.basename(os.path.normpath(run_dir))
    owner = lock_path(run_dir, OWNER_LOCK, node_rank)
    try:
        fd = os.open(owner, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise RunLockError(f"cannot open the lock file {owner}: {e.strerror}") from None
    if not _try_lock(fd, fcntl.LOCK_EX):
        os.close(fd)
        raise RunLockError(f"run {name!r} is in use by {describe_holder(owner)}; wait for it to end or stop it "
                           f"(it holds {owner})")
    workers = lock_path(run_dir, WORKERS_LOCK, node_rank)
    try:
        wfd = os.open(workers, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        os.close(fd)
        raise RunLockError(f"cannot open the lock file {workers}: {e.strerror}") from None
    try:
        if not _try_lock(wfd, fcntl.LOCK_EX):
            os.close(fd)
            raise RunLockError(f"training workers of an earlier launch of {name!r} still run "
                               f"({describe_holder(workers)}); wait for them to end or stop them")
    finally:
        os.close(wfd)  # a test, not a hold: the workers of this launch take it shared
    return fd


def write_holder(fd: int, argv: list[str] | None = None) -> None:
    """Records the holder in its lock file, for the message a second claimant gets."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(argv if argv is not None else sys.argv)[:1000]}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError:
        pass  # the lock itself is what counts


def holder(run_dir: str, node_rank: int = 0) -> str | None:
    """Who owns the run folder now (its launcher or still-running workers), or None; creates nothing."""
    for kind in (OWNER_LOCK, WORKERS_LOCK):
        path = lock_path(run_dir, kind, node_rank)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not _try_lock(fd, fcntl.LOCK_EX):
                return describe_holder(path)
        finally:
            os.close(fd)
    return None


def hold_as_worker(run_dir: str, node_rank: int = 0, timeout: float = 60.0) -> int | None:
    """A worker's share of the folder: the workers lock, shared, kept until the process dies."""
    path = lock_path(run_dir, WORKERS_LOCK, node_rank)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    deadline = time.time() + timeout
    while not _try_lock(fd, fcntl.LOCK_SH):  # a claimant holds it exclusively only for a moment
        if time.time() > deadline:
            raise RunLockError(f"{path} is held exclusively by {describe_holder(path)}")
        time.sleep(0.05)
    return fd


PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG): the kernel sends `sig` to this process when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def worker_dies_with_launcher() -> None:
    """In a worker started by run.py through torchrun: SIGKILL when torchrun dies; exit at once if
    torchrun or the launcher is already gone (the death signal is armed only from now on)."""
    set_parent_death_signal(signal.SIGKILL)
    launcher = os.environ.get(LAUNCHER_ENV)
    if launcher and launcher.isdigit() and os.path.exists("/proc/self/stat"):
        if _parent_of(os.getppid()) != int(launcher):
            os._exit(1)


def torchrun_preexec(launcher_pid: int):
    """preexec_fn for torchrun: SIGTERM (a graceful stop of its workers) when the launcher dies."""
    def preexec():
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != launcher_pid:
            os._exit(1)
    return preexec


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (its children, theirs, ...), from one pass over /proc (Linux; []
    elsewhere): collected before killing a tree, whose orphans would be re-parented away from it."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit():
            children.setdefault(_parent_of(int(entry)), []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux; [] elsewhere)."""
    out = []  # (not /proc/PID/task/PID/children: it lists only the children of one thread)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if entry.isdigit() and _parent_of(int(entry)) == pid:
            out.append(int(entry))
    return out
