"""pixstream: Pix message collection over push-driven HTTP long polling."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask

from pixstream import api, cli, config, db, migrate, runtime

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: settings, database, schema, routes, CLI. Nothing is opened yet."""
    app = Flask(__name__)
    config.load(app.config, test_config)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if app.config["DATABASE_URL"] is None:
        app.config["DATABASE_URL"] = db.embedded_url(app.config["DATA_DIR"])
    migrate.upgrade(app.config["DATABASE_URL"])
    runtime.init_app(app)
    api.init_app(app)
    cli.init_app(app)
    return app
