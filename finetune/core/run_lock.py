"""One writer per run folder: an OS file lock on run_dir/.moetune.lock while a command may write there.

The lock is `flock(2)` on an open file: the kernel drops it when the process ends however it ends (kill -9
included), so no stale marker can block a later command. A second command that would write the same run folder
refuses at once, naming the process that holds it (its PID and command line are written in the lock file).
Commands that only read a run (`report`, `push`, `--help`, `--trl-fields`) take no lock. In a launched
multi-process run the command that launched the processes holds the lock for them (MOETUNE_LOCK_HELD_BY).
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from finetune.core.rundir import StageError

LOCK_FILE = ".moetune.lock"
REFUSED_WRITES = (errno.EROFS, errno.ENOSPC)  # a read-only run dir, a full disk
HELD_BY = "MOETUNE_LOCK_HELD_BY"  # set for the processes a locking command launches: they write under its lock


class RunDirBusy(StageError):
    """Another live process holds the run folder's lock."""


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold run_dir's lock for the block; refuse at once (RunDirBusy) when another process holds it."""
    if os.environ.get(HELD_BY):
        yield  # a process launched by the command that holds the lock
        return
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = acquire(run_dir / LOCK_FILE)
    except OSError as error:
        if error.errno not in REFUSED_WRITES:
            raise
        handle = None
    if handle is None:
        # The disk takes no write at all, so no other command can write here either: the first stage that
        # writes says what is wrong and what to do, in its own words (finetune/core/disk_errors.py).
        yield
        return
    os.environ[HELD_BY] = str(os.getpid())  # inherited by `accelerate launch` and its processes
    try:
        yield
    finally:
        del os.environ[HELD_BY]
        # Unlink while still holding the lock: a process that opened the old file finds it gone (acquire retries).
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        handle.close()


def acquire(path: Path):
    """Open and lock `path`; the lock holds for as long as the returned file stays open."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirBusy(f"{path.parent} is in use by {holder}; one command at a time writes a run folder. "
                             f"Wait for it to finish (or stop it), or point run_dir at another folder.") from None
        if same_file(handle, path):
            break
        handle.close()  # the holder removed this file as it let go: lock the new one
    handle.seek(0)
    handle.truncate()
    handle.write(f"PID {os.getpid()} (`{' '.join(['moetune', *sys.argv[1:]])}`)\n")
    handle.flush()
    return handle


def same_file(handle, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False
