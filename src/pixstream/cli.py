"""``flask seed-pix`` and ``flask db-upgrade``."""

from __future__ import annotations

import time

import click
from flask import Flask, current_app
from flask.cli import FlaskGroup, with_appcontext

from pixstream import migrate
from pixstream.errors import InvalidRequest
from pixstream.runtime import runtime
from pixstream.seeding import insert_random
from pixstream.validation import parse_ispb


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


def init_app(app: Flask) -> None:
    app.cli.add_command(seed_pix)
    app.cli.add_command(db_upgrade)


def main() -> None:
    """The ``pixstream`` console script: Flask's CLI bound to this app."""
    from pixstream import create_app

    FlaskGroup(create_app=create_app)()
