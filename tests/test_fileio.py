"""fileio: the one atomic write (temp file, fsync of the file and its directory, rename)."""

import errno
import json
import os
import stat

import pytest

from worker import fileio


def test_write_fsyncs_file_and_directory_and_leaves_no_temp(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = tmp_path / "summary.json"
    fileio.write_json(str(path), {"status": "finished"})
    assert json.loads(path.read_text()) == {"status": "finished"}
    assert synced == [False, True]  # the file, then the directory holding the rename
    fileio.write_atomic(str(tmp_path / "blob.bin"), lambda f: f.write(b"\x00\x01"), binary=True)
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["blob.bin", "summary.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "config.json"
    fileio.write_text_atomic(str(path), "old\n")

    def fail(f):
        f.write("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        fileio.write_atomic(str(path), fail)
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["config.json"]
