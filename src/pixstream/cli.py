"""``flask seed-pix``, ``flask db-upgrade``, the ``token`` and ``cert`` groups, and the
``pixstream`` console script (which also runs ``pixstream collect``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click
from flask import Flask, current_app
from flask.cli import FlaskGroup, with_appcontext

from pixstream import migrate
from pixstream.errors import InvalidRequest, PixstreamError
from pixstream.runtime import runtime
from pixstream.seeding import insert_random
from pixstream.validation import parse_ispb

if TYPE_CHECKING:
    from pixstream.access import AccessService, CredentialInfo


@click.command("seed-pix")
@click.argument("ispb")
@click.argument("count", type=click.IntRange(min=1))
@click.option(
    "--batch",
    "batch_size",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Messages per COPY and transaction.",
)
@with_appcontext
def seed_pix(ispb: str, count: int, batch_size: int) -> None:
    """Insert COUNT realistic Pix messages addressed to ISPB.

    Says where they went: a server that uses another database (another
    PIXSTREAM_DATA_DIR or DATABASE_URL) will not see them.
    """
    try:
        ispb = parse_ispb(ispb)
    except InvalidRequest as exc:
        raise click.BadParameter(str(exc), param_hint="ISPB") from exc
    current = runtime()
    started = time.perf_counter()
    with click.progressbar(
        length=count, label=f"seeding {ispb}", hidden=count < batch_size * 2
    ) as bar:
        inserted = insert_random(
            current.pool, ispb, count, batch_size=batch_size, on_batch=bar.update
        )
    elapsed = time.perf_counter() - started
    click.echo(
        f"inserted {inserted} messages for {ispb} in {elapsed:.2f} s "
        f"({inserted / elapsed:,.0f} messages/s)"
    )
    click.echo(f"into {current.location}")


@click.command("db-upgrade")
@with_appcontext
def db_upgrade() -> None:
    """Apply pending schema migrations (the Procfile's release phase)."""
    applied = migrate.upgrade(current_app.config["DATABASE_URL"])
    click.echo(f"applied: {', '.join(applied)}" if applied else "schema up to date")


def _ispb_argument(value: str) -> str:
    try:
        return parse_ispb(value)
    except InvalidRequest as exc:
        raise click.BadParameter(str(exc), param_hint="ISPB") from exc


def _access() -> AccessService:
    """The credential service without a listener: a command authenticates nobody."""
    from pixstream.access import AccessService

    return AccessService(runtime().pool, None)


@contextmanager
def _errors() -> Iterator[None]:
    """Domain errors (a bad value, a duplicate, the database down) as click errors."""
    try:
        yield
    except PixstreamError as exc:
        raise click.ClickException(str(exc)) from exc


def _when(value: datetime | None, never: str = "never") -> str:
    return never if value is None else value.isoformat(timespec="seconds")


def _describe(info: CredentialInfo) -> str:
    """One line about a credential: never its secret (a token's hash is not shown either)."""
    owner = "admin" if info.admin else info.ispb
    parts = [
        f"{info.id}",
        f"{owner}",
        info.kind,
        f"label={info.label!r}",
        f"created={_when(info.created_at)}",
        f"last_used={_when(info.last_used_at)}",
        f"expires={_when(info.expires_at)}",
        f"revoked={_when(info.revoked_at, 'no')}",
    ]
    if info.kind == "cert":
        parts += [f"fingerprint=sha256:{info.fingerprint}", f"subject={info.subject!r}"]
    return "  ".join(parts)


def _list(kind: str, ispb: str | None) -> None:
    with _errors():
        credentials = _access().list_credentials(
            None if ispb is None else _ispb_argument(ispb), kind=kind
        )
    if not credentials:
        click.echo(f"no {kind} credentials" + (f" for {ispb}" if ispb else ""))
    for info in credentials:
        click.echo(_describe(info))


def _revoke(kind: str, credential_id: int) -> None:
    with _errors():
        access = _access()
        info = access.get_credential(credential_id)
        if info is None or info.kind != kind:
            raise click.ClickException(f"no {kind} credential has id {credential_id}")
        already = info.revoked_at is not None
        access.revoke(credential_id)
    if already:
        click.echo(f"{kind} {credential_id} was already revoked on {_when(info.revoked_at)}")
    else:
        click.echo(f"revoked {kind} {credential_id}: every host refuses it within a second")


@click.group("token")
def token_group() -> None:
    """Bearer tokens: one ISPB each, or an administrator's (util routes)."""


@token_group.command("create")
@click.argument("ispb", required=False)
@click.option("--admin", is_flag=True, help="An administrator token (no ISPB): util routes only.")
@click.option("--label", default="", help="What the token is for, for people.")
@click.option(
    "--expires",
    "expires_days",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Days until it expires (default: never).",
)
@with_appcontext
def token_create(ispb: str | None, admin: bool, label: str, expires_days: float | None) -> None:
    """Create a token for ISPB (or --admin); it is printed once, and only its hash is kept."""
    if admin and ispb is not None:
        raise click.UsageError("an administrator token belongs to no ISPB: drop ISPB or --admin")
    if not admin and ispb is None:
        raise click.UsageError("give the token's ISPB, or --admin for an administrator token")
    with _errors():
        info, token = _access().create_token(
            None if ispb is None else _ispb_argument(ispb),
            label,
            admin=admin,
            expires_days=expires_days,
        )
    click.echo(f"created: {_describe(info)}")
    click.echo(f"token: {token}")
    click.echo("Store it now: it cannot be shown again (only its hash is kept).")


@token_group.command("list")
@click.argument("ispb", required=False)
@with_appcontext
def token_list(ispb: str | None) -> None:
    """List the tokens (of ISPB, or all, administrators included); never a secret."""
    _list("token", ispb)


@token_group.command("revoke")
@click.argument("credential_id", metavar="ID", type=int)
@with_appcontext
def token_revoke(credential_id: int) -> None:
    """Revoke token ID on every host (idempotent)."""
    _revoke("token", credential_id)


@click.group("cert")
def cert_group() -> None:
    """Client certificates (mTLS mode): registered by fingerprint, one ISPB each."""


@cert_group.command("add")
@click.argument("ispb")
@click.argument(
    "pem_file", type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path)
)
@click.option("--label", default="", help="What the certificate is for, for people.")
@with_appcontext
def cert_add(ispb: str, pem_file: Path, label: str) -> None:
    """Register the client certificate in PEM_FILE (PEM or DER) for ISPB."""
    with _errors():
        info = _access().add_certificate(_ispb_argument(ispb), pem_file.read_bytes(), label)
    click.echo(f"added: {_describe(info)}")


@cert_group.command("list")
@click.argument("ispb", required=False)
@with_appcontext
def cert_list(ispb: str | None) -> None:
    """List the certificates (of ISPB, or all), with fingerprints and subjects."""
    _list("cert", ispb)


@cert_group.command("revoke")
@click.argument("credential_id", metavar="ID", type=int)
@with_appcontext
def cert_revoke(credential_id: int) -> None:
    """Revoke certificate ID on every host (idempotent)."""
    _revoke("cert", credential_id)


@click.command(
    "collect",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def collect_command(args: tuple[str, ...]) -> None:
    """Collect an ISPB's messages from a service (a client: see `pixstream collect --help`)."""
    from pixstream import collect

    raise SystemExit(collect.run(list(args)))


COMMANDS: tuple[click.Command, ...] = (
    seed_pix,
    db_upgrade,
    token_group,
    cert_group,
    collect_command,
)


def init_app(app: Flask) -> None:
    for command in COMMANDS:
        app.cli.add_command(command)


def main() -> None:
    """The ``pixstream`` console script: Flask's CLI bound to this app.

    ``pixstream collect`` is a client: it is dispatched before the app is
    built, so it needs no database and works against any server.
    """
    import sys

    if sys.argv[1:2] == ["collect"]:
        from pixstream import collect

        sys.exit(collect.run(sys.argv[2:]))
    from pixstream import create_app

    FlaskGroup(create_app=create_app)()
