"""The OpenAPI document: valid 3.1, in step with the routes, true to real answers.

Bodies are validated with jsonschema-rs: the Python ``jsonschema`` package tests
``multipleOf: 0.01`` with a float division and rejects about one amount in nine
(``0.07 / 0.01 == 7.000000000000001``).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from importlib.resources import files
from typing import Any

import jsonschema_rs
from flask import Flask
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from werkzeug.test import TestResponse

from pixstream.api.docs import ASSETS, openapi_document

DOC: dict[str, Any] = json.loads(openapi_document())
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
ISPB, OTHER_ISPB, BUSY_ISPB = "32074986", "60701190", "00360305"


def deref(node: dict[str, Any]) -> dict[str, Any]:
    """Follow local ``$ref``s (``#/components/...``) to the object they name."""
    while "$ref" in node:
        target: Any = DOC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def validator(schema: dict[str, Any]) -> jsonschema_rs.Draft202012Validator:
    """A validator for a schema of the document, its ``#/components/...`` refs resolvable."""
    return jsonschema_rs.Draft202012Validator(
        {**schema, "components": DOC["components"]}, validate_formats=True
    )


def errors(schema: dict[str, Any], instance: Any) -> list[str]:
    return [f"{e.instance_path}: {e.message}" for e in validator(schema).iter_errors(instance)]


# -- the document itself ------------------------------------------------------


def test_document_is_valid_openapi_3_1():
    assert DOC["openapi"].startswith("3.1.")
    validate(DOC, cls=OpenAPIV31SpecValidator)


def test_document_is_kept_pretty_printed():
    """Two-space indent, UTF-8 as is; amounts may keep their two decimals (90.20)."""
    text = (files("pixstream.api") / "openapi.json").read_text(encoding="utf-8")
    as_python_writes_numbers = re.sub(
        r"(?<=[\s\[:])-?\d+\.\d+(?=[,\s\]}])", lambda m: repr(float(m[0])), text
    )
    assert as_python_writes_numbers == json.dumps(DOC, indent=2, ensure_ascii=False) + "\n"


def _examples(node: Any) -> Iterator[tuple[dict[str, Any], Any, str]]:
    """Every example in the document, with the schema it illustrates."""
    if isinstance(node, dict):
        if "schema" in node:
            if "example" in node:
                yield node["schema"], node["example"], "example"
            for name, example in node.get("examples", {}).items():
                yield node["schema"], deref(example)["value"], name
        elif isinstance(node.get("examples"), list):  # a JSON Schema's own examples
            schema = {k: v for k, v in node.items() if k != "examples"}
            for value in node["examples"]:
                yield schema, value, repr(value)
        for value in node.values():
            yield from _examples(value)
    elif isinstance(node, list):
        for value in node:
            yield from _examples(value)


def test_every_example_matches_its_schema():
    checked = 0
    for schema, value, name in _examples(DOC):
        assert errors(schema, value) == [], name
        checked += 1
    assert checked > 30


# -- routes -------------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def served_operations(app: Flask) -> set[tuple[str, str]]:
    """(path, method) for every route, Flask's ``<x>`` written as OpenAPI's ``{x}``."""
    operations = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", lambda m: "{" + _camel(m[1]) + "}", rule.rule)
        operations |= {
            (path, m.lower()) for m in rule.methods or () if m not in ("HEAD", "OPTIONS")
        }
    return operations


def documented_operations() -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in DOC["paths"].items()
        for method in item
        if method in METHODS
    }


def test_every_route_is_documented_and_every_documented_route_served(app):
    assert served_operations(app) == documented_operations()


def test_util_routes_are_documented_and_disappear_when_disabled(make_app):
    util = {op for op in documented_operations() if op[0].startswith("/api/util/")}
    assert util == {("/api/util/msgs/{ispb}/{number}", "post")}
    assert served_operations(make_app(UTIL_ROUTES=False)) == documented_operations() - util


# -- real answers conform -----------------------------------------------------


def check(response: TestResponse, path: str, method: str) -> Any:
    """Assert that ``response`` is one the document describes; return its JSON body."""
    operation = DOC["paths"][path][method]
    assert str(response.status_code) in operation["responses"], (
        f"{method.upper()} {path}: {response.status_code} is not documented"
    )
    documented = deref(operation["responses"][str(response.status_code)])
    for name, header in documented.get("headers", {}).items():
        header = deref(header)
        value = response.headers.get(name)
        if value is None:
            assert not header.get("required"), f"{response.status_code}: no {name} header"
            continue
        schema = deref(header["schema"])
        assert errors(schema, int(value) if schema.get("type") == "integer" else value) == [], name
    content = documented.get("content", {})
    if not content:
        assert response.data == b""
        return None
    media_types = {key.split(";")[0].strip() for key in content}
    assert response.mimetype in media_types, f"{response.mimetype} not in {media_types}"
    if not response.mimetype.endswith("json"):
        return None
    data = response.data
    if response.headers.get("Content-Encoding") == "gzip":
        data = gzip.decompress(data)
    body = json.loads(data)
    media = next(v for k, v in content.items() if k.split(";")[0].strip() == response.mimetype)
    assert errors(media["schema"], body) == [], body
    return body


START = "/api/pix/{ispb}/stream/start"
STREAM = "/api/pix/{ispb}/stream/{interationId}"
UTIL = "/api/util/msgs/{ispb}/{number}"


def test_real_stream_exchanges_conform(client):
    check(client.post(f"/api/util/msgs/{ISPB}/12"), UTIL, "post")

    single = client.get(f"/api/pix/{ISPB}/stream/start")
    message = check(single, START, "get")
    assert message["recebedor"]["ispb"] == ISPB

    batch = client.get(
        single.headers["Pull-Next"],
        headers={"Accept": "multipart/json", "Accept-Encoding": "gzip", "X-Request-ID": "t-1"},
    )
    assert batch.headers["Content-Encoding"] == "gzip"
    assert batch.headers["X-Request-ID"] == "t-1"
    assert len(check(batch, STREAM, "get")) == 10

    last = client.get(batch.headers["Pull-Next"], headers={"Accept": "multipart/json"})
    assert len(check(last, STREAM, "get")) == 1
    empty = client.get(last.headers["Pull-Next"])
    assert empty.status_code == 204
    check(empty, STREAM, "get")

    closed = client.delete(empty.headers["Pull-Next"])
    assert check(closed, STREAM, "delete") == {}
    gone = client.get(empty.headers["Pull-Next"])
    assert gone.status_code == 410
    check(gone, STREAM, "get")


def test_real_errors_conform(client):
    cases = [
        (client.get("/api/pix/1234/stream/start"), START, "get", 400),
        (client.post(f"/api/util/msgs/{ISPB}/0"), UTIL, "post", 400),
        (
            client.get(f"/api/pix/{ISPB}/stream/start", headers={"Accept": "text/html"}),
            START,
            "get",
            406,
        ),
        (client.get(f"/api/pix/{ISPB}/stream/abcdefghijkl0123"), STREAM, "get", 404),
        (client.delete(f"/api/pix/{ISPB}/stream/abcdefghijkl0123"), STREAM, "delete", 404),
        (client.delete(f"/api/pix/{ISPB}/stream/start"), STREAM, "delete", 405),
    ]
    for response, path, method, status in cases:
        assert response.status_code == status, response.data
        assert check(response, path, method)["status"] == status

    # Another ISPB's id is unknown here.
    client.post(f"/api/util/msgs/{OTHER_ISPB}/1")
    theirs = client.get(f"/api/pix/{OTHER_ISPB}/stream/start").headers["Pull-Next"]
    response = client.get(theirs.replace(OTHER_ISPB, ISPB))
    assert response.status_code == 404
    check(response, STREAM, "get")


def test_idempotency_key_answers_conform(client):
    client.post(f"/api/util/msgs/{ISPB}/2")
    url, key = f"/api/pix/{ISPB}/stream/start", {"Idempotency-Key": '"conform-1"'}
    first = client.get(url, headers=key)
    assert check(first, START, "get")["recebedor"]["ispb"] == ISPB
    repeat = client.get(url, headers=key)
    assert (repeat.status_code, repeat.headers["Pull-Next"], repeat.data) == (
        200, first.headers["Pull-Next"], first.data,
    )  # fmt: skip
    assert client.get(first.headers["Pull-Next"]).status_code == 200
    used = client.get(url, headers=key)
    assert used.status_code == 409, used.data
    assert check(used, START, "get")["type"] == "urn:pixstream:problem:idempotency-key-used"
    invalid = client.get(url, headers={"Idempotency-Key": "k" * 256})
    assert invalid.status_code == 400, invalid.data
    check(invalid, START, "get")


def test_seventh_stream_conforms(make_app):
    client = make_app(MAX_STREAMS_PER_ISPB=6).test_client()
    client.post(f"/api/util/msgs/{BUSY_ISPB}/6")  # every start answers at once
    for _ in range(6):
        assert client.get(f"/api/pix/{BUSY_ISPB}/stream/start").status_code == 200
    refused = client.get(f"/api/pix/{BUSY_ISPB}/stream/start")
    assert refused.status_code == 429
    assert check(refused, START, "get")["status"] == 429


def test_operations_and_docs_routes_conform(client):
    check(client.get("/healthz"), "/healthz", "get")
    check(client.get("/readyz"), "/readyz", "get")
    check(client.get("/metrics"), "/metrics", "get")
    check(client.get("/docs"), "/docs", "get")
    for file in ASSETS:
        response = client.get(f"/docs/assets/{file}")
        assert response.status_code == 200, file
        check(response, "/docs/assets/{file}", "get")
    missing = client.get("/docs/assets/index.html")
    assert missing.status_code == 404
    check(missing, "/docs/assets/{file}", "get")

    served = client.get("/openapi.json")
    check(served, "/openapi.json", "get")
    assert served.data == (files("pixstream.api") / "openapi.json").read_bytes()


def test_metrics_media_type_is_the_documented_one(client):
    (documented,) = DOC["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert client.get("/metrics").headers["Content-Type"].startswith(documented)
