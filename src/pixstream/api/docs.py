"""API documentation: the OpenAPI document and a Swagger UI page, served offline.

The document is hand-maintained in ``openapi.json`` beside this module and is
served byte for byte. Swagger UI comes from the ``swagger-ui-bundle-v2``
package (import name ``swagger_ui_bundle``); only the files the page uses are
served, from this app, so the page needs no CDN and no network beyond it.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from flask import Blueprint, Response, render_template, send_from_directory
from swagger_ui_bundle import swagger_ui_path
from werkzeug.exceptions import NotFound

bp = Blueprint("docs", __name__, template_folder="templates")

# The Swagger UI files the page loads (and their source maps, for DevTools),
# with the media type each is served as; anything else is a 404.
ASSETS: dict[str, str] = {
    "swagger-ui.css": "text/css",
    "swagger-ui.css.map": "application/json",
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-bundle.js.map": "application/json",
    "favicon-16x16.png": "image/png",
    "favicon-32x32.png": "image/png",
}


@cache
def openapi_document() -> bytes:
    """Return the OpenAPI document exactly as it is kept in the package."""
    return (files("pixstream.api") / "openapi.json").read_bytes()


@bp.get("/openapi.json")
def openapi() -> Response:
    """Serve the OpenAPI 3.1 document of every route."""
    return Response(openapi_document(), mimetype="application/json")


@bp.get("/docs")
def page() -> str:
    """Render the document with Swagger UI."""
    return render_template("docs.html")


@bp.get("/docs/assets/<file>")
def asset(file: str) -> Response:
    """Serve one Swagger UI file from the installed package."""
    if file not in ASSETS:
        raise NotFound(f"no documentation asset named {file!r}")
    return send_from_directory(swagger_ui_path, file, mimetype=ASSETS[file], max_age=86400)
