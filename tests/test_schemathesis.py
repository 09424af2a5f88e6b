"""Schemathesis against a live gunicorn: every operation of the document, generated
requests (valid and invalid), each answer checked against the document.

The document is the packaged file, which test_openapi.py proves is what
/openapi.json serves. Short windows keep it fast: about 60 of the requests are
long polls on ISPBs with no messages, each a 204 after the window.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import Server
from pixstream.api.docs import openapi_document

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Bounded: about 1,000 requests over the 10 operations, under a minute in all.
MAX_EXAMPLES = 25
SEEDED_ISPB = "00000000"

schema = schemathesis.openapi.from_dict(json.loads(openapi_document()))


@pytest.fixture(scope="module")
def live_server(database_url: str) -> Iterator[Server]:
    # One server for every operation (the shared fixtures start one per test).
    server = Server(
        database_url,
        LONG_POLL_SECONDS=0.3,  # a start on an ISPB with no messages is a 204 after this
        POOL_TIMEOUT_SECONDS=2,  # must stay under the long poll + 2 s
        STREAM_IDLE_SECONDS=3,
        UTIL_MAX_MESSAGES=20,  # larger counts are documented 400s: no 100k-row inserts
    )
    yield server
    server.stop()


@pytest.fixture
def seeded_server(live_server: Server) -> Server:
    """The live server, with messages for the ISPB Hypothesis tries most.

    It tries the simplest ISPB, the documented example 00000000, again and again:
    with messages there, reads answer 200 with bodies to check, and six streams
    holding one each make the next start a 429. (The database is emptied before
    each test, so this runs for each operation.)
    """
    for _ in range(3):
        # A new connection: the last test may have outlived the server's keep-alive.
        reply = live_server.http.request("POST", f"/api/util/msgs/{SEEDED_ISPB}/20", fresh=True)
        assert reply.status == 201
    return live_server


@pytest.mark.server
@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_live_server_conforms_to_its_document(case, seeded_server):
    case.call_and_validate(base_url=seeded_server.base, checks=CHECKS, timeout=10)
