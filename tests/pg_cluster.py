"""A throwaway PostgreSQL cluster on a loopback port, for the store tests and CI.

``python3 tests/pg_cluster.py start`` prints the cluster's folder and DSN (``.ci/run`` exports
the DSN as ``HEADSTART_TEST_PG_DSN``); ``python3 tests/pg_cluster.py stop FOLDER`` stops it.
The conftest fixture starts one the same way when no DSN is given, so ``make test`` works on
a machine with the Debian ``postgresql`` package and nothing running. ``initdb`` refuses to
run as root, so as root the cluster belongs to the ``postgres`` user. Standard library only:
CI runs it before the virtual environment exists.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def bindir() -> Path:
    """The newest installed server's binaries (Debian keeps them off the PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise FileNotFoundError("no PostgreSQL server found: apt-get install postgresql (or set HEADSTART_TEST_PG_DSN)")
    return Path(initdb).resolve().parent


def _as_owner() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start() -> tuple[Path, str]:
    """A running cluster's folder and the DSN of its ``postgres`` database (trust auth, loopback)."""
    bin_ = bindir()
    root = Path(tempfile.mkdtemp(prefix="headstart-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", _free_port()
    quiet = {"stdout": subprocess.DEVNULL, "check": True}
    subprocess.run([*_as_owner(), str(bin_ / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                    "-E", "UTF8", "--no-sync"], **quiet)
    options = (f"-k {root} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
               "-c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB")
    subprocess.run([*_as_owner(), str(bin_ / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options,
                    "-w", "-t", "60", "start"], **quiet)
    return root, f"postgresql://postgres@127.0.0.1:{port}/postgres"


def stop(root: Path) -> None:
    subprocess.run([*_as_owner(), str(bindir() / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w",
                    "stop"], stdout=subprocess.DEVNULL, check=False)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["start"]:
        folder, dsn = start()
        print(folder, dsn)
    elif sys.argv[1:2] == ["stop"] and len(sys.argv) == 3:
        stop(Path(sys.argv[2]))
    else:
        sys.exit("usage: pg_cluster.py start | stop FOLDER")
