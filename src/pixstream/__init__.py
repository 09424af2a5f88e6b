"""pixstream: Pix message collection over push-driven HTTP long polling."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from pixstream import api, cli, config, db, logs, migrate, runtime


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: settings, database, schema, routes, CLI. Nothing is opened yet."""
    app = Flask(__name__)
    config.load(app.config, test_config)
    logs.configure(app.config["LOG_FORMAT"], app.config["LOG_LEVEL"])
    if app.config["DATABASE_URL"] is None:
        app.config["DATABASE_URL"] = db.embedded_url(app.config["DATA_DIR"])
    migrate.upgrade_at_start(app.config["DATABASE_URL"])
    runtime.init_app(app)
    api.init_app(app)
    cli.init_app(app)
    return app
