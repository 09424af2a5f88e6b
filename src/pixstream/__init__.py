"""pixstream: Pix message collection over push-driven HTTP long polling.

Importing the package imports nothing more: gunicorn's master process imports
pixstream.oslimits before it forks the workers, and psycopg must not be
imported before gevent patches a worker (see gunicorn.conf.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: settings, logging, the database and its schema, routes, CLI.

    This touches the database: without DATABASE_URL it starts (or attaches to)
    the embedded PostgreSQL, and it applies pending migrations (a database
    that is down is tolerated, and so is a migration lock held past a few
    seconds: the app then starts not ready until the schema is current). The
    pool, the listener and the sweeper start only later, after gunicorn has
    forked the worker (its post_worker_init hook) or on first use.
    """
    from flask import Flask

    from pixstream import api, cli, config, db, logs, migrate, runtime

    app = Flask(__name__)
    config.load(app.config, test_config)
    logs.configure(app.config["LOG_FORMAT"], app.config["LOG_LEVEL"])
    database = db.locate(app.config["DATABASE_URL"], app.config["DATA_DIR"])
    app.config["DATABASE_URL"] = database.url
    pending = migrate.upgrade_at_start(database.url)
    runtime.init_app(app, location=database.location, pending_migrations=pending)
    api.init_app(app)
    cli.init_app(app)
    return app
