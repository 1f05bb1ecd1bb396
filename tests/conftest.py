"""Fixtures shared by the whole suite.

* ``require(need)``: skip a test whose host lacks ``need`` - or fail it, when ``need`` is
  listed in ``CORRAL_TEST_REQUIRE`` (comma-separated), so CI cannot pass by skipping.
* ``store_url``: a fresh, migrated database per test, on SQLite (a file under tmp_path)
  and on PostgreSQL (marked ``postgres``). PostgreSQL databases are cloned from a template
  migrated once per session (``CREATE DATABASE ... TEMPLATE``), which is far quicker than
  migrating each one. The server comes from ``CORRAL_TEST_POSTGRES_URL``.
* ``blank_store_url``: the same two engines, but an empty database nobody has migrated.
* ``store``: a ``Store`` opened on ``store_url`` and closed afterwards.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from corral.config import Settings
from corral.context import Corral
from corral.errors import RequirementMissing
from corral.sandbox.runc_runtime import RuncRuntime
from corral.store import Store

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"

_ENGINES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


def require(need: str, detail: str = "") -> NoReturn:
    """Skip the current test for want of ``need``, or fail it if CI insists on ``need``."""
    required = {item.strip() for item in os.environ.get("CORRAL_TEST_REQUIRE", "").split(",")}
    message = f"this test needs {need}, which is not available" + (f": {detail}" if detail else "")
    if need in required:
        pytest.fail(f"{message} (CORRAL_TEST_REQUIRE lists {need!r})")
    pytest.skip(message)


class PostgresServer:
    """The test PostgreSQL server: creates and drops the databases the tests use."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.created: set[str] = set()

    def url_for(self, database: str) -> str:
        return make_url(self.url).set(database=database).render_as_string(hide_password=False)

    def _execute(self, statement: sql.Composed) -> None:
        # CREATE/DROP DATABASE refuse to run inside a transaction: autocommit.
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(statement)

    def create(self, database: str, template: str = "template0") -> str:
        self._execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(database), sql.Identifier(template)
            )
        )
        self.created.add(database)
        return self.url_for(database)

    def drop(self, database: str) -> None:
        self._execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
        )
        self.created.discard(database)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The server at CORRAL_TEST_POSTGRES_URL; every database made on it is dropped at the end."""
    url = os.environ.get("CORRAL_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        shown = make_url(url).render_as_string(hide_password=True)
        require("postgres", f"cannot connect to {shown} (CORRAL_TEST_POSTGRES_URL): {exc}")
    server = PostgresServer(url)
    yield server
    for database in sorted(server.created):
        server.drop(database)


@pytest.fixture(scope="session")
def postgres_template(postgres_server: PostgresServer) -> str:
    """Name of a database migrated to head once per session, to clone test databases from."""
    name = f"corral_template_{os.getpid()}"
    postgres_server.drop(name)
    Store.open(postgres_server.create(name)).close()  # close(): a template must be idle
    return name


@pytest.fixture(params=_ENGINES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh database already migrated to head, on each engine in turn."""
    if request.param == "sqlite":
        path = tmp_path / "store" / "corral.db"
        Store.open(f"sqlite:///{path}").close()
        yield f"sqlite:///{path}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    template: str = request.getfixturevalue("postgres_template")
    name = f"corral_test_{secrets.token_hex(6)}"
    url = server.create(name, template=template)
    try:
        yield url
    finally:
        server.drop(name)


@pytest.fixture(params=_ENGINES)
def blank_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty database nothing has migrated (its SQLite directory does not exist)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'not-yet' / 'corral.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"corral_test_{secrets.token_hex(6)}"
    url = server.create(name)
    try:
        yield url
    finally:
        server.drop(name)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A Store opened on ``store_url``."""
    opened = Store.open(store_url)
    try:
        yield opened
    finally:
        opened.close()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Sandbox data directories hold immutable runner trees; unlock them so that pytest can
    delete old temporary directories as usual."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None and os.geteuid() == 0:
        from corral.snapshots import overlay
        from corral.snapshots.fsattr import unlock_layer_caches

        unlock_layer_caches(factory.getbasetemp())
        # Drafts are loop-mounted images; a test that failed before removing its environment
        # would otherwise leave one mounted (and its loop device taken) until the next boot.
        for point in overlay.mounted_under(factory.getbasetemp()):
            overlay.unmount(point)


# -- sandboxes: shared by tests/integration and tests/e2e -------------------------------


def need_sandboxes() -> None:
    if os.geteuid() != 0:
        require("root", "sandboxes mount overlays and create network namespaces")
    if shutil.which("runc") is None:
        require("runc", "apt-get install runc (scripts/install-deps.sh)")


def runc_runtime(corral: Corral) -> RuncRuntime:
    """``corral``'s runtime, its host prepared: the real one, with its slot registry and
    network, which tests of what a sandbox leaves on the host look into."""
    runtime = corral.sandboxes()
    assert isinstance(runtime, RuncRuntime), runtime
    return runtime


@pytest.fixture(scope="session")
def corral(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corral]:
    need_sandboxes()
    data = tmp_path_factory.mktemp("corral-data")
    port = os.environ.get("CORRAL_BRIDGE_PORT") or str(8800 + secrets.randbelow(80))
    settings = Settings.from_env(
        {**os.environ, "CORRAL_DATA_DIR": str(data), "CORRAL_BRIDGE_PORT": port}
    )
    if not settings.base_image.is_file():
        require("runc", f"the base image {settings.base_image}: run scripts/build-base-image.sh")
    c = Corral(settings)
    try:
        c.sandboxes()
    except RequirementMissing as exc:
        require("runc", exc.detail)
    yield c
    c.close()


@pytest.fixture
def env(corral: Corral) -> Iterator[str]:
    name = f"t-{secrets.token_hex(4)}"
    corral.envs.create(name)
    yield name
    corral.envs.delete(name)


def run(
    corral: Corral, name: str, *argv: str, edit: bool = False, timeout: float = 60
) -> tuple[int, str, str]:
    """Run ``argv`` in a sandbox (an edit session with ``edit``); (exit code, stdout, stderr)."""
    start = corral.envs.exec if edit else corral.envs.run
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"corral-test-{secrets.token_hex(4)}"
    with open(f"{out}.out", "w+b") as o, open(f"{out}.err", "w+b") as e:
        try:
            result = start(
                name, tuple(argv), stdin=subprocess.DEVNULL, stdout=o, stderr=e, timeout=timeout
            )
            o.seek(0)
            e.seek(0)
            return result.exit_code, o.read().decode(), e.read().decode()
        finally:
            os.unlink(f"{out}.out")
            os.unlink(f"{out}.err")
