"""HTTP blueprints: parsing, negotiation and headers; the protocol lives elsewhere."""

from __future__ import annotations

from flask import Flask

from pixstream.api import auth, console, docs, health, middleware, problems, streams, util


def init_app(app: Flask) -> None:
    problems.init_app(app)
    middleware.init_app(app)  # first: the request id is set before auth can refuse
    auth.init_app(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(streams.bp)
    streams.forbid_head(app)
    app.register_blueprint(docs.bp)
    app.register_blueprint(console.bp)
    if app.config["UTIL_ROUTES"]:
        app.register_blueprint(util.bp)
