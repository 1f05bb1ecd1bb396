"""A private PostgreSQL cluster a test owns: it can stop, start and restart it at will.

The shared server (``CORRAL_TEST_POSTGRES_URL``) serves every test at once, so no test may
take it down; a test about a database outage makes its own cluster with the server binaries
(``initdb`` into a temporary directory, run as the ``postgres`` OS user, since PostgreSQL
refuses to run as root) on a free loopback port, and removes it afterwards.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.conftest import require

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


class PrivateCluster:
    def __init__(self) -> None:
        found = next((d for d in BIN_DIRS if (d / "initdb").is_file()), None)
        if found is None:
            require("postgres", "no PostgreSQL server binaries under /usr/lib/postgresql")
        try:
            self.user = pwd.getpwnam("postgres")
        except KeyError:
            require("postgres", "there is no postgres OS user to run a private cluster as")
        self.bin = found
        self.dir = Path(tempfile.mkdtemp(prefix="corral-pg-"))
        os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.data = self.dir / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._as_postgres("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.start()
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE corral")

    def url(self, database: str = "corral") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._as_postgres("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"),
                          "-o", options, "-w", "start")  # fmt: skip

    def stop(self) -> None:
        """Fast shutdown: every session is terminated, as in a real restart."""
        self._as_postgres("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self, down: float) -> None:
        """Stop, stay down ``down`` seconds, start again."""
        self.stop()
        time.sleep(down)
        self.start()

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_postgres("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop",
                              check=False)  # fmt: skip
        shutil.rmtree(self.dir, ignore_errors=True)

    def _as_postgres(self, tool: str, *args: str, check: bool = True) -> None:
        proc = subprocess.run(
            ["runuser", "-u", "postgres", "--", str(self.bin / tool), *args],
            capture_output=True,
            text=True,
            cwd=self.dir,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr or proc.stdout}")
