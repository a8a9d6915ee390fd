"""One run per run folder: an exclusive lock on ``CHECKPOINT.DIR`` for the life of the run.

Two runs on one folder would resume each other mid-run and overwrite each other's checkpoints
and logs. The launcher (or rank 0 under torchrun / srun, where no launcher of ours runs) takes
``<CHECKPOINT.DIR>/.vissl_vit.lock`` with ``fcntl.flock`` before anything is built, and writes its
pid, host and start time into it; a second run on the folder is refused with a message naming
them. The kernel releases a flock when the last descriptor of the lock file closes, so a run
killed with kill -9 leaves no stale lock behind: the next run takes the lock as usual.

Forked children (the DataLoader's workers) inherit the descriptor and would keep the lock held
after their parent dies, until they notice it: they drop it at start with
:func:`close_inherited_locks` (closing a copy does not unlock; the parent keeps the lock).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket

from vissl_vit.errors import UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".vissl_vit.lock"

# descriptors of the locks this process holds (a forked child closes its copies)
_HELD: set[int] = set()


class RunLock:
    """A held lock on a run folder; :meth:`release` (or the end of the process) gives it up.

    Args:
        fd: the open lock file (None when the file system does not support locks).
        path: the lock file.
    """

    def __init__(self, fd: int | None, path: str) -> None:
        self.fd, self.path = fd, path

    def release(self) -> None:
        """Unlock and close (idempotent). The lock file stays: the next run reuses it."""
        if self.fd is None:
            return
        _HELD.discard(self.fd)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> str:
    """The lock holder as 'pid N on host H, started T' (from the lock file's JSON line)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):  # the holder has not written it yet
        return "a process that is still starting"


def lock_run_folder(run_dir: str) -> RunLock:
    """Lock ``run_dir`` (created if needed) for this run, or raise a UserError naming the holder.

    Args:
        run_dir: the run folder (CHECKPOINT.DIR).

    Returns:
        The held lock; keep it (and call ``release``) until the run ends.
    """
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            holder = _holder(fd)
            os.close(fd)
            raise UserError(
                f"config.CHECKPOINT.DIR={run_dir} is in use by another run ({holder}): wait for it to end, stop "
                "it, or give this run another config.CHECKPOINT.DIR."
            ) from None
        # a file system without locks (some network mounts): run unprotected rather than not at all
        os.close(fd)
        logger.warning("Cannot lock %s (%s): nothing stops a second run on this folder", path, e.strerror)
        return RunLock(None, path)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (record + "\n").encode(), 0)
    _HELD.add(fd)
    return RunLock(fd, path)


def close_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock descriptors (the parent keeps the
    locks; a child that outlives it no longer holds the run folder)."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()
