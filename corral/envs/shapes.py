"""The JSON shapes of environments and snapshots, shared by the CLI's --json and the HTTP API."""

from __future__ import annotations

from typing import Any

from corral.store import Environment, Snapshot


def environment(env: Environment) -> dict[str, Any]:
    return {
        "name": env.name,
        "base": env.base,
        "head": env.head,
        "created_at": env.created_at,
        "updated_at": env.updated_at,
    }


def snapshot(snap: Snapshot) -> dict[str, Any]:
    return {
        "digest": snap.digest,
        "environment": snap.environment,
        "seq": snap.seq,
        "parent": snap.parent,
        "layer": snap.layer,
        "size": snap.size,
        "created_at": snap.created_at,
        "message": snap.message,
    }
