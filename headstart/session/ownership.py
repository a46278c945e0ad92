"""One server at a time on a database and its spill folder.

Two servers writing the same SQLite file each believe they own its sessions, and the last
writer wins: a turn one of them acknowledged can vanish. So a server claims its data with
an OS advisory lock (``flock``) on a file beside it. The kernel drops the lock when the
holder's process ends, however it ends, so a ``kill -9`` never leaves a stale claim behind;
the file only keeps the holder's pid, host and start time, for the refusal message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import weakref
from pathlib import Path


class Claimed(RuntimeError):
    """Another live process holds the data; the message names it."""


class Claim:
    """An exclusive hold on ``path`` until :meth:`release`, the object is collected, or the
    process ends."""

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise Claimed(f"{what} is in use by another headstart server ({holder}); stop that server, "
                          "or give this one its own --db and --spill-dir (or HEADSTART_DATA)") from None
        except BaseException:
            os.close(fd)
            raise
        self._release = weakref.finalize(self, os.close, fd)  # closing the descriptor drops the lock
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)

    def release(self) -> None:
        self._release()


def _read(fd: int) -> str:
    """The holder as its lock file describes it (it may not have written itself yet)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["started"]))
        return f"pid {holder['pid']} on {holder['host']}, started {started}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that has not recorded itself yet"
