"""Fixtures for tests that boot real sandboxes live in tests/conftest.py (shared with e2e).

Lifecycle, as in Firecracker's uvm fixtures: ``corral`` (a Corral on a private data directory,
shared by the session; its first environment imports the base image once) -> ``env`` (a fresh
environment from the base image). A failing test keeps its data directory (``tmp_path_factory``
keeps the last three runs).
"""

from tests.conftest import need_sandboxes, run, runc_runtime

__all__ = ["need_sandboxes", "run", "runc_runtime"]
