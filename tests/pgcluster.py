"""A private PostgreSQL cluster a test owns: it can stop, start and restart it at will.

The shared server (``CORRAL_TEST_POSTGRES_URL``) serves every test at once, so no test may
take it down; a test about a database outage makes its own cluster with the server binaries
(``initdb`` into a temporary directory, run as the ``postgres`` OS user, since PostgreSQL
refuses to run as root) on a free loopback port, and removes it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
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
        self._as_postgres(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "log"),
            "-o",
            options,
            "-w",
            "start",
        )

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
            self._as_postgres(
                "pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False
            )
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


class Cuttable:
    """A TCP forwarder to ``port`` on loopback whose link can be cut and healed: the database as
    one process sees it, while every other process still reaches it directly."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self.is_cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        """Drop every connection through it, and every new one until ``heal``."""
        with self._lock:
            self.is_cut = True
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def heal(self) -> None:
        with self._lock:
            self.is_cut = False

    def close(self) -> None:
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self.is_cut:
                    client.close()
                    continue
                try:
                    server = socket.create_connection(("127.0.0.1", self.upstream))
                except OSError:
                    client.close()
                    continue
                self._open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
