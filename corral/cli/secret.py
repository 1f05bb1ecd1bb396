"""``corral secret`` (users' credentials) and ``corral vault`` (the master keys that seal them).

A secret reaches Corral on stdin only - as a JSON object of the kind's fields, or, for
``bearer`` and ``api_key``, as one line - or from a hidden prompt on a terminal. Never from
argv: argv is visible to every user of the host in ``ps`` and lands in shell history. What
these commands print is metadata only; no command here can show a secret.
"""

from __future__ import annotations

import json
import sys
from typing import IO

import click

from corral.cli.main import handled, json_option
from corral.cli.output import emit
from corral.context import Corral
from corral.errors import InvalidInput
from corral.vault import KINDS
from corral.vault.kinds import FIELDS, SECRET_FIELDS

_MAX_STDIN = 1 << 20  # far above any credential; a bigger stdin is a mistake, not a key
_ONE_LINE_KINDS = {"bearer": "token", "api_key": "key"}


@click.group("secret")
def secret_group() -> None:
    """Users' credentials for their connections, sealed in the vault."""


@secret_group.command("set")
@click.argument("user")
@click.argument("connection")
@click.option("--kind", type=click.Choice(KINDS), required=True, help="What the secret is.")
@json_option
@click.pass_obj
@handled
def set_(corral: Corral, user: str, connection: str, kind: str, as_json: bool) -> None:
    """Store USER's credential for CONNECTION, reading its fields from stdin.

    \b
    echo '{"token": "..."}' | corral secret set alice github --kind bearer
    corral secret set alice openai --kind api_key < key.txt
    corral secret set alice jira --kind basic <<< '{"username": "a", "password": "..."}'
    """
    fields = read_fields(kind, sys.stdin)
    info = corral.vault.put(user, connection, kind, fields)
    emit(
        as_json,
        info.to_dict(),
        lambda: click.echo(
            f"stored {kind} credential {connection!r} for {user} "
            f"(sealed under master key {info.key_id})"
        ),
    )


@secret_group.command("list")
@click.option("--user", help="Only this user's credentials.")
@json_option
@click.pass_obj
@handled
def list_(corral: Corral, user: str | None, as_json: bool) -> None:
    """Every credential's metadata: user, connection, kind, master key, times. No secrets."""
    infos = corral.vault.list(user)

    def human() -> None:
        for i in infos:
            state = "revoked" if i.revoked else f"key {i.key_id}"
            click.echo(
                f"{i.user:<20} {i.connection:<16} {i.kind:<8} {state:<20} "
                f"updated {i.updated_at:%Y-%m-%d %H:%M:%S}"
            )

    emit(as_json, [i.to_dict() for i in infos], human)


@secret_group.command("revoke")
@click.argument("user")
@click.argument("connection")
@json_option
@click.pass_obj
@handled
def revoke(corral: Corral, user: str, connection: str, as_json: bool) -> None:
    """Revoke USER's credential for CONNECTION: its sealed bytes are destroyed."""
    info = corral.vault.revoke(user, connection)
    emit(as_json, info.to_dict(), lambda: click.echo(f"revoked {info.connection!r} of {info.user}"))


@click.group("vault")
def vault_group() -> None:
    """The master keys that seal every credential, and the bridge's signing keys."""


@vault_group.command("rotate")
@json_option
@click.pass_obj
@handled
def rotate(corral: Corral, as_json: bool) -> None:
    """Make a new master key primary and rewrap every credential under it, and every signing
    key of the bridge that still verifies run tokens.

    With the key file, a new key is generated and the old ones kept. With
    CORRAL_MASTER_KEY, put the new key first in the variable (old ones after it) first.
    """
    done = corral.vault.rotate()

    def human() -> None:
        click.echo(
            f"primary master key: {done.primary}; rewrapped {done.rewrapped} credential(s) "
            f"and {done.signing_keys} signing key(s)"
        )
        for kid, n in sorted(done.usage.items()):
            click.echo(f"  {kid}: {n} credential(s)")
        for failure in done.failed:
            click.echo(f"corral: could not rewrap {failure}", err=True)

    emit(as_json, done.to_dict(), human)
    if done.failed:
        sys.exit(1)


@vault_group.command("retire")
@click.argument("key_id")
@json_option
@click.pass_obj
@handled
def retire(corral: Corral, key_id: str, as_json: bool) -> None:
    """Remove old master key KEY_ID from the key file, once no credential (and no signing key
    of the bridge) uses it."""
    left = corral.vault.retire(key_id)
    emit(
        as_json,
        {"retired": key_id, "keys": list(left)},
        lambda: click.echo(f"retired master key {key_id}; {len(left)} key(s) left"),
    )


@vault_group.command("keys")
@json_option
@click.pass_obj
@handled
def keys(corral: Corral, as_json: bool) -> None:
    """Every master key id, which is primary, and how many credentials (and signing keys of
    the bridge) each seals."""
    statuses = corral.vault.keys()

    def human() -> None:
        click.echo(f"source: {corral.vault.key_source}")
        for k in statuses:
            mark = "*" if k.primary else " "
            note = "" if k.present else "  (MISSING from the key ring)"
            signing = f", {k.signing_keys} signing key(s)" if k.signing_keys else ""
            click.echo(f"{mark} {k.key_id}  {k.records} credential(s){signing}{note}")

    emit(as_json, [k.to_dict() for k in statuses], human)


def read_fields(kind: str, stream: IO[str]) -> dict[str, object]:
    """The secret fields of a ``kind`` credential, from ``stream`` (stdin) or a terminal."""
    if stream.isatty():
        return _prompt(kind)
    raw = stream.read(_MAX_STDIN + 1)
    if len(raw) > _MAX_STDIN:
        raise InvalidInput(f"stdin is larger than {_MAX_STDIN} bytes; that is not a credential")
    text = raw.strip()
    if text.startswith("{"):
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            # What and where only: the decoder's message never quotes the document.
            raise InvalidInput(
                f"stdin looks like JSON but is not: {exc.msg} at character {exc.pos}"
            ) from None
        if not isinstance(fields, dict):
            raise InvalidInput("stdin must be a JSON object of the credential's fields")
        return fields
    if kind not in _ONE_LINE_KINDS:
        raise InvalidInput(
            f"a {kind} credential is read from stdin as a JSON object with "
            f"{', '.join(FIELDS[kind][0])}"
        )
    if not text:
        raise InvalidInput(f"stdin is empty; pipe the {_ONE_LINE_KINDS[kind]} into this command")
    if "\n" in text:
        raise InvalidInput(
            f"stdin has more than one line; a {kind} credential is one line, or a JSON object"
        )
    return {_ONE_LINE_KINDS[kind]: text}


def _prompt(kind: str) -> dict[str, object]:
    required, optional = FIELDS[kind]
    fields: dict[str, object] = {}
    for name in required:
        fields[name] = click.prompt(name, hide_input=name in SECRET_FIELDS, err=True)
    for name in optional:
        value = click.prompt(f"{name} (optional)", default="", show_default=False, err=True)
        if value:
            fields[name] = int(value) if value.isdigit() else value
    return fields


def register(cli: click.Group) -> None:
    cli.add_command(secret_group)
    cli.add_command(vault_group)
