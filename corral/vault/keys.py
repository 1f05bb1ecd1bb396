"""Master keys: the key ring that wraps every sealed record's data key, and where it lives.

A ``MasterKeyRing`` holds 32-byte AES-256 master keys by key id (the first 16 hex digits of the
key's sha256), one of them primary: new records are wrapped under the primary, and the
others are kept only so that records wrapped before a rotation can still be opened.

``MasterKeys`` is where the ring comes from, in this order:

* ``CORRAL_MASTER_KEY`` (``Settings.master_key``): base64 keys separated by commas, the
  first primary. The variable is the operator's to change; this module never writes it.
* otherwise the key file ``<data_dir>/vault/master.keys``, JSON
  ``{"primary": kid, "keys": {kid: base64}}``, created on first use with one random key,
  mode 0600 in a 0700 directory. A key file other users could read or write, or that
  someone else owns, is refused: whoever can read it can decrypt every credential.

Key material must never appear in a message, a log line or a ``repr``: errors name the
file, the variable or the key id. The ring is re-read whenever the key file changes on
disk, so a rotation done by another process (``corral vault rotate`` next to a running
server) is seen at the next seal or open rather than at the next restart.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import json
import os
import secrets
import stat
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

from corral.config import MASTER_KEY_BYTES, Secret, Settings, master_key_parts
from corral.errors import MasterKeyError

KEY_FILE_NAME: Final = "master.keys"
KEY_ID_HEX: Final = 16
ENV_SOURCE: Final = "CORRAL_MASTER_KEY"
_MAX_KEY_FILE: Final = 1 << 20  # a ring of thousands of keys; anything bigger is not ours


def key_id(key: bytes) -> str:
    """The id of a master key: not secret, and the same in every process and on every host."""
    return hashlib.sha256(key).hexdigest()[:KEY_ID_HEX]


def new_key() -> bytes:
    """A fresh random master key."""
    return secrets.token_bytes(MASTER_KEY_BYTES)


@dataclass(frozen=True, eq=False)
class MasterKeyRing:
    """Master keys by key id; ``primary`` wraps new data keys. Immutable."""

    primary: str
    keys: Mapping[str, bytes] = field(repr=False)
    source: str  # "CORRAL_MASTER_KEY" or the key file's path: for messages

    def __post_init__(self) -> None:
        for kid, key in self.keys.items():
            if len(key) != MASTER_KEY_BYTES or key_id(key) != kid:
                raise MasterKeyError(
                    f"{self.source}: key {kid} is not a {MASTER_KEY_BYTES}-byte key with that id"
                )
        if self.primary not in self.keys:
            raise MasterKeyError(f"{self.source}: the primary key {self.primary} is not in it")
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))

    @classmethod
    def of(cls, keys: Iterable[bytes], source: str) -> MasterKeyRing:
        """A ring of ``keys``, the first one primary; a repeated key is kept once."""
        listed = list(keys)
        if not listed:
            raise MasterKeyError(f"{source} holds no master key")
        return cls(primary=key_id(listed[0]), keys={key_id(k): k for k in listed}, source=source)

    @property
    def primary_key(self) -> bytes:
        return self.keys[self.primary]

    def get(self, kid: str) -> bytes | None:
        return self.keys.get(kid)

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id, the primary first."""
        return (self.primary, *sorted(k for k in self.keys if k != self.primary))

    def promoted(self, key: bytes) -> MasterKeyRing:
        """This ring with ``key`` added (if new) and made primary."""
        kid = key_id(key)
        return MasterKeyRing(primary=kid, keys={**self.keys, kid: key}, source=self.source)

    def without(self, kid: str) -> MasterKeyRing:
        return MasterKeyRing(
            primary=self.primary,
            keys={k: v for k, v in self.keys.items() if k != kid},
            source=self.source,
        )


class MasterKeys:
    """The source of the key ring: ``CORRAL_MASTER_KEY`` if set, else the key file."""

    def __init__(self, env: Secret | None, path: Path) -> None:
        self._env = env
        self.path = path
        self._lock = threading.Lock()
        self._ring: MasterKeyRing | None = None
        self._seen: tuple[int, ...] | None = None  # the key file's identity when last read

    @classmethod
    def from_settings(cls, settings: Settings) -> MasterKeys:
        return cls(settings.master_key, settings.vault_dir / KEY_FILE_NAME)

    @property
    def from_env(self) -> bool:
        return self._env is not None

    @property
    def source(self) -> str:
        return ENV_SOURCE if self._env is not None else str(self.path)

    def ring(self, needing: str | None = None) -> MasterKeyRing:
        """The current ring; the key file is created on first use and re-read if it changed.

        ``needing``: a key id the caller is about to use. If the ring lacks it, the file is
        read once more (another process may have rotated an instant ago) before giving up;
        the caller raises ``UnknownMasterKey`` if it is still missing.
        """
        with self._lock:
            if self._env is not None:
                if self._ring is None:
                    keys = master_key_parts(self._env.reveal())
                    self._ring = MasterKeyRing.of(keys, ENV_SOURCE)
                return self._ring
            ring = self._ring
            if ring is None or self._changed() or (needing and ring.get(needing) is None):
                # The ring and the file identity it was read from change together, so a
                # failed write elsewhere can never leave a stale ring looking current.
                ring, self._seen = self._load_or_create()
                self._ring = ring
            return ring

    def promote(self, key: bytes | None) -> MasterKeyRing:
        """Make ``key`` (a fresh one if None) the primary, keeping every older key.

        With the key file as the source the new ring is written to it. With
        ``CORRAL_MASTER_KEY`` nothing can be written: the new key must already be first in
        the variable (None means "the first one there"), and the ring is returned as is.
        """
        if key is not None and len(key) != MASTER_KEY_BYTES:
            raise MasterKeyError(f"a master key is {MASTER_KEY_BYTES} bytes, not {len(key)}")
        if self._env is not None:
            ring = self.ring()
            if key is not None and key_id(key) != ring.primary:
                raise MasterKeyError(
                    f"{ENV_SOURCE} is the key source, so the new key {key_id(key)} must already "
                    "be first in it: set CORRAL_MASTER_KEY=<new>,<old>[,...] for every Corral "
                    "process, restart them, then rotate"
                )
            return ring
        with self._locked():
            ring, _ = self._load_or_create(locked=True)
            self._write(ring.promoted(key if key is not None else new_key()))
        return self.ring()

    def remove(self, kid: str) -> MasterKeyRing:
        """Remove key ``kid`` from the key file. The caller checks that no record needs it."""
        if self._env is not None:
            raise MasterKeyError(
                f"{ENV_SOURCE} is the key source: remove key {kid} from the variable yourself "
                "and restart every Corral process"
            )
        with self._locked():
            ring, _ = self._load_or_create(locked=True)
            if kid == ring.primary:
                raise MasterKeyError(f"key {kid} is the primary key; rotate to a new one first")
            if ring.get(kid) is None:
                raise MasterKeyError(f"{self.path} holds no key {kid}; it holds {ring.key_ids}")
            self._write(ring.without(kid))
        return self.ring()

    # -- the key file ---------------------------------------------------------------

    def _changed(self) -> bool:
        try:
            return _identity(os.stat(self.path)) != self._seen
        except FileNotFoundError:
            return True

    def _load_or_create(self, *, locked: bool = False) -> tuple[MasterKeyRing, tuple[int, ...]]:
        """The key file's ring and the file's identity, creating the file if there is none.

        ``locked``: the caller already holds ``_locked`` (flock is per open file, so taking
        it again from this process would wait for ever).
        """
        loaded = self._load()
        if loaded is not None:
            return loaded
        if not locked:
            with self._locked():  # two first uses at once must not write two different keys
                return self._load_or_create(locked=True)
        self._write(MasterKeyRing.of([new_key()], str(self.path)))
        loaded = self._load()
        if loaded is None:
            raise MasterKeyError(f"key file {self.path} vanished as soon as it was written")
        return loaded

    def _load(self) -> tuple[MasterKeyRing, tuple[int, ...]] | None:
        """The key file's ring and identity, or None if there is no key file."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:  # ELOOP: a symlink, refused so the file cannot be redirected
            raise MasterKeyError(
                f"cannot open key file {self.path} (it must be a regular file, not a symlink): "
                f"{exc.strerror}"
            ) from exc
        try:
            info = os.fstat(fd)  # the open file's own mode: no window between check and read
            self._check_safe(info)
            raw = os.read(fd, _MAX_KEY_FILE + 1)
        finally:
            os.close(fd)
        if len(raw) > _MAX_KEY_FILE:
            raise MasterKeyError(f"key file {self.path} is larger than {_MAX_KEY_FILE} bytes")
        return self._parse(raw), _identity(info)

    def _check_safe(self, info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            raise MasterKeyError(f"key file {self.path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise MasterKeyError(
                f"refusing key file {self.path}: it is owned by uid {info.st_uid}, not by this "
                f"process's uid {os.geteuid()}, so someone else could replace the keys; "
                f"fix it with `chown {os.geteuid()} {self.path}`"
            )
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise MasterKeyError(
                f"refusing key file {self.path}: its mode {mode:04o} lets other users read or "
                f"change it; fix it with `chmod 600 {self.path}`, and since the keys may have "
                "been read, run `corral vault rotate` and retire the old key"
            )

    def _parse(self, raw: bytes) -> MasterKeyRing:
        where = f"key file {self.path}"
        try:
            doc = json.loads(raw)
        except ValueError:
            raise MasterKeyError(f"{where} is not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict):
            raise MasterKeyError(f'{where} must be {{"primary": <kid>, "keys": {{<kid>: <b64>}}}}')
        keys = {}
        for kid, encoded in doc["keys"].items():
            try:
                key = base64.b64decode(str(encoded), validate=True)
            except (binascii.Error, ValueError):
                raise MasterKeyError(f"{where}: key {kid} is not base64") from None
            if len(key) != MASTER_KEY_BYTES or key_id(key) != kid:
                raise MasterKeyError(
                    f"{where}: key {kid} is not a {MASTER_KEY_BYTES}-byte key with that id"
                )
            keys[kid] = key
        if not isinstance(doc.get("primary"), str) or doc["primary"] not in keys:
            raise MasterKeyError(f"{where}: 'primary' must name one of its keys")
        return MasterKeyRing(primary=doc["primary"], keys=keys, source=str(self.path))

    def _write(self, ring: MasterKeyRing) -> None:
        """Replace the key file with ``ring``, atomically, mode 0600. Call under ``_locked``."""
        doc = {
            "primary": ring.primary,
            "keys": {kid: base64.b64encode(key).decode() for kid, key in ring.keys.items()},
        }
        tmp = self.path.with_name(f".{KEY_FILE_NAME}.{secrets.token_hex(6)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, json.dumps(doc, indent=2).encode() + b"\n")
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise writers of the key file, across processes."""
        self._ensure_dir()
        fd = os.open(
            self.path.with_name(KEY_FILE_NAME + ".lock"),
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _ensure_dir(self) -> None:
        directory = self.path.parent
        if directory.is_dir():
            return
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            directory.mkdir(mode=0o700)
            os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        except FileExistsError:
            pass
        except OSError as exc:
            raise MasterKeyError(f"cannot create the key directory {directory}: {exc}") from exc


def _identity(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
