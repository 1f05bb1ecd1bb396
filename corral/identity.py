"""Who is asking: the principal every request, command and run acts as.

A principal is a user and a role. An API key (``corral key create``) resolves to one; the
embedded command line, which talks to the store directly and not to a server, acts as the
local operator. Everything a user makes belongs to that user; a query is scoped to its
caller's user in the store itself (``scope``), so another user's object is not found, not
forbidden. The operator's scope is everything.

This module sits at the bottom of the layers: it imports nothing from Corral.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    """What a principal may do beyond its own objects (values as stored)."""

    USER = "user"  # its own objects, and what the operator shares with it
    # Also: grant credits, create users, publish runner releases, rotate the vault, share
    # objects, and see every user's objects.
    OPERATOR = "operator"


@dataclass(frozen=True)
class Principal:
    user: str
    role: Role = Role.USER
    key_id: str | None = None  # the API key it came with; None for the embedded CLI

    @property
    def operator(self) -> bool:
        return self.role is Role.OPERATOR

    @property
    def scope(self) -> str | None:
        """The owner a store query is scoped to: this user, or None (every owner) for the
        operator."""
        return None if self.operator else self.user


# The embedded, single-machine command line: no server, no key, the machine's own operator.
LOCAL_OPERATOR = Principal("local", Role.OPERATOR)
