"""``flask token ...`` and ``flask cert ...``: round trips through the real database."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from click.testing import Result
from flask import Flask

from _streamkit import new_ispb, wait_for
from pixstream.access import CredentialRejected
from pixstream.runtime import runtime
from test_access import make_ca, make_client_cert

TOKEN = re.compile(r"^token: (pxs_[A-Za-z0-9_-]{43})$", re.MULTILINE)
CREATED = re.compile(r"^(?:created|added): (\d+) ", re.MULTILINE)


def run(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=list(args))


def created_token(result: Result) -> tuple[int, str]:
    assert result.exit_code == 0, result.output
    token = TOKEN.search(result.output)
    created = CREATED.search(result.output)
    assert token and created, result.output
    return int(created.group(1)), token.group(1)


def reason(app: Flask, token: str | None = None, certificate: bytes | None = None) -> str | None:
    """Why the app's own access service refuses the credential; None if it accepts it."""
    with app.app_context():
        try:
            if token is not None:
                runtime().access.authenticate_token(token)
            else:
                assert certificate is not None
                runtime().access.authenticate_certificate(certificate)
        except CredentialRejected as exc:
            return exc.reason
    return None


def test_token_create_list_revoke(
    app: Flask, db: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ispb = new_ispb()
    result = run(app, "token", "create", ispb, "--label", "collector A", "--expires", "30")
    credential_id, token = created_token(result)
    assert result.output.count(token) == 1, "the token is printed exactly once"
    assert "cannot be shown again" in result.output
    assert reason(app, token) is None

    listed = run(app, "token", "list", ispb)
    assert listed.exit_code == 0, listed.output
    (line,) = listed.output.splitlines()
    assert line.startswith(f"{credential_id}  {ispb}  token  label='collector A'")
    assert "expires=20" in line and "revoked=no" in line
    (digest,) = db.execute(
        "SELECT encode(secret_hash, 'hex') FROM pix_credential WHERE id = %s", (credential_id,)
    ).fetchone()  # type: ignore[misc]
    everything = run(app, "token", "list")
    assert str(credential_id) in everything.output
    for output in (listed.output, everything.output):
        assert token not in output and digest not in output

    revoked = run(app, "token", "revoke", str(credential_id))
    assert revoked.exit_code == 0, revoked.output
    assert f"revoked token {credential_id}" in revoked.output
    # The app's cache hears of it through LISTEN pix_credentials: within a second.
    wait_for(lambda: reason(app, token) == "revoked", timeout=1, what="the revocation")
    again = run(app, "token", "revoke", str(credential_id))
    assert again.exit_code == 0 and "already revoked" in again.output
    assert "revoked=20" in run(app, "token", "list", ispb).output

    for record in caplog.records:
        assert token not in record.getMessage() + repr(record.args)


def test_admin_token_and_usage_errors(app: Flask) -> None:
    credential_id, token = created_token(run(app, "token", "create", "--admin", "--label", "ops"))
    assert f"{credential_id}  admin  token" in run(app, "token", "list").output
    with app.app_context():
        principal = runtime().access.authenticate_token(token)
    assert principal.admin and principal.ispb is None

    cases = [
        (["token", "create"], "--admin"),
        (["token", "create", new_ispb(), "--admin"], "no ISPB"),
        (["token", "create", "1234"], "8 digits"),
        (["token", "create", new_ispb(), "--expires", "0"], "--expires"),
        (["token", "list", "abc"], "8 digits"),
        (["token", "revoke", "999999999"], "no token credential has id 999999999"),
        (["token", "revoke", "x"], "not a valid integer"),
    ]
    for args, message in cases:
        result = run(app, *args)
        assert result.exit_code != 0, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_cert_add_list_revoke(app: Flask, tmp_path: Path) -> None:
    ispb = new_ispb()
    client = make_client_cert(make_ca(), f"bank {ispb}")
    pem_file = tmp_path / "client.pem"
    pem_file.write_bytes(client.pem)
    added = run(app, "cert", "add", ispb, str(pem_file), "--label", "edge")
    assert added.exit_code == 0, added.output
    match = CREATED.search(added.output)
    assert match, added.output
    credential_id = int(match.group(1))
    assert f"fingerprint=sha256:{client.fingerprint}" in added.output

    listed = run(app, "cert", "list", ispb)
    assert listed.exit_code == 0, listed.output
    assert client.fingerprint in listed.output and f"CN=bank {ispb}" in listed.output
    assert str(credential_id) in run(app, "cert", "list").output
    assert "no token credentials" in run(app, "token", "list", ispb).output

    with app.app_context():
        assert runtime().access.authenticate_certificate(client.der).ispb == ispb

    duplicate = run(app, "cert", "add", new_ispb(), str(pem_file))
    assert duplicate.exit_code != 0 and "registered already" in duplicate.output
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    bad = run(app, "cert", "add", ispb, str(junk))
    assert bad.exit_code != 0 and "could not be parsed" in bad.output
    missing = run(app, "cert", "add", ispb, str(tmp_path / "absent.pem"))
    assert missing.exit_code != 0 and "does not exist" in missing.output

    # A token command does not revoke a certificate, and the other way round.
    wrong = run(app, "token", "revoke", str(credential_id))
    assert wrong.exit_code != 0 and "no token credential" in wrong.output
    revoked = run(app, "cert", "revoke", str(credential_id))
    assert revoked.exit_code == 0, revoked.output
    wait_for(lambda: reason(app, certificate=client.pem) == "revoked", timeout=1, what="revocation")


def test_console_script_has_the_groups(database_url: str, tmp_path: Path) -> None:
    """``pixstream token ...`` is the same CLI as ``flask token ...``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIXSTREAM_", "FLASK_"))}
    env["DATABASE_URL"] = database_url
    ispb = new_ispb()
    command = [sys.executable, "-c", "from pixstream.cli import main; main()"]
    created = subprocess.run(
        [*command, "token", "create", ispb, "--label", "script"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    token = TOKEN.search(created.stdout)
    assert token, created.stdout
    assert token.group(1) not in created.stderr, "the token reached the log"
    listed = subprocess.run(
        [*command, "token", "list", ispb],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "label='script'" in listed.stdout and token.group(1) not in listed.stdout
