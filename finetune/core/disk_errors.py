"""A full disk or a read-only run dir, said in words: which path, and what to do.

Any stage can hit these while writing (prep's splits, a checkpoint, a stage's output, eval's judgments). Nothing
half-written is ever taken for done (stages commit by renaming their work folder, checkpoints count only once
sealed, eval's records are appended whole), so the fix is always the same: make room or choose another run_dir,
then run the same command again.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from finetune.core.rundir import StageError

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
NOT_WRITABLE = {errno.EACCES, errno.EPERM}  # read-only too, when the path is in the run dir
# safetensors (Rust) writes with its own I/O and wraps the OS error in its message.
OS_MESSAGES = {"No space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
               "Read-only file system": errno.EROFS, "os error 30": errno.EROFS}
# torch.save's C++ writer fails on a full disk without the reason ("unexpected pos ..."): then the disk is asked.
TORCH_WRITER = ("PytorchStreamWriter", "inline_container")
NEARLY_FULL_BYTES = 1 << 20


def disk_errno(error: BaseException, run_dir: Path) -> int | None:
    """The errno of a full-disk or read-only failure behind `error`, or None for any other failure."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and (seen.errno in NO_SPACE or seen.errno == errno.EROFS
                                          or seen.errno in NOT_WRITABLE and inside(seen.filename, run_dir)):
            return seen.errno
        text = str(seen)
        if code := next((code for known, code in OS_MESSAGES.items() if known in text), None):
            return code
        if any(name in text for name in TORCH_WRITER) and free_bytes(run_dir) < NEARLY_FULL_BYTES:
            return errno.ENOSPC
        seen = seen.__cause__ or seen.__context__
    return None


def inside(filename, folder: Path) -> bool:
    return filename is not None and Path(filename).resolve().is_relative_to(folder.resolve())


def free_bytes(path: Path) -> int:
    existing = next((folder for folder in (path, *path.parents) if folder.exists()), Path("/"))
    return shutil.disk_usage(existing).free


def disk_error_message(stage: str, error: BaseException, code: int, run_dir: Path) -> str:
    path = getattr(error, "filename", None)
    retry = ("then run the same command again: finished work and sealed checkpoints are kept, and nothing "
             "half-written was committed.")
    if code in NO_SPACE:
        return (f"[{stage}] no space left on the disk holding {run_dir}{f' (writing {path})' if path else ''}. Free "
                f"space on that disk, or move {run_dir} to a disk with room and point run_dir there; {retry}")
    return (f"[{stage}] cannot write {path or run_dir}: the run dir {run_dir} is read-only ({error}). Make it "
            f"writable, or set run_dir to a writable folder; {retry}")


def raise_disk_error(stage: str, error: BaseException, run_dir: Path) -> None:
    """Re-raise a full-disk or read-only failure as a StageError that says what to do; leave others alone."""
    code = disk_errno(error, Path(run_dir))
    if code is not None:
        raise StageError(disk_error_message(stage, error, code, Path(run_dir))) from error
