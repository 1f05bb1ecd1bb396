"""Content digests: the names of everything a snapshot is made of.

A digest is ``sha256:`` followed by 64 lowercase hex characters. Every blob in the OCI layout is
named by the digest of its bytes, so a digest that was ever written names the same bytes forever.
"""

from __future__ import annotations

import hashlib
import re
from typing import BinaryIO

from corral.errors import InvalidInput

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK = 1 << 20


def check(digest: str) -> str:
    """Return ``digest`` unchanged, or raise InvalidInput naming what is wrong with it."""
    if not _DIGEST.match(digest):
        raise InvalidInput(f"{digest!r} is not a digest of the form sha256:<64 lowercase hex>")
    return digest


def hex_of(digest: str) -> str:
    return check(digest).split(":", 1)[1]


def of_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def of_stream(stream: BinaryIO) -> tuple[str, int]:
    """Digest and length of everything left in ``stream``."""
    h = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return "sha256:" + h.hexdigest(), size


class HashingWriter:
    """A write-only file object that hashes and counts what passes through to ``sink``."""

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._sink.write(data)

    def flush(self) -> None:
        self._sink.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()
