"""The client stands alone: importing it loads no server module, and the
client-only distribution (clients/python) installs with httpx as its only
dependency, into a fresh virtual environment, without the index."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement  # gunicorn's dependency

from conftest import ROOT

# The same whichever database server and auth mode the suite runs with: CI's
# second pass leaves it out (setup.cfg, marker once).
pytestmark = pytest.mark.once

SERVER_MODULES = ("flask", "gevent", "psycopg", "psycopg_pool", "werkzeug", "gunicorn")


def test_importing_the_client_and_the_command_loads_no_server_module():
    code = (
        "import sys, pixstream.client, pixstream.collect\n"
        f"print([m for m in {SERVER_MODULES!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def _closure(name: str, found: dict[str, importlib.metadata.Distribution]) -> None:
    """The installed distributions ``name`` needs (extras and other Pythons left out)."""
    key = name.lower().replace("_", "-")
    if key in found:
        return
    dist = importlib.metadata.distribution(name)
    found[key] = dist
    for text in dist.requires or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            _closure(requirement.name, found)


def test_client_only_distribution_installs_and_runs_without_the_server(tmp_path):
    # Build the wheel: setuptools straight from its PEP 517 hooks, no network.
    wheels = tmp_path / "wheels"
    build = "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])"
    subprocess.run([sys.executable, "-c", build, str(wheels)], cwd=ROOT / "clients/python",
                   check=True, capture_output=True)  # fmt: skip
    (wheel,) = wheels.glob("pixstream_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert {"pixstream/client.py", "pixstream/collect.py", "pixstream/py.typed"} <= names
    assert "pixstream/__init__.py" not in names  # a namespace portion: the client only
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert requires == ["Requires-Dist: httpx>=0.27"]

    # Install it into a fresh venv with pip --no-deps; httpx and what it needs
    # (only those) are copied from this environment instead of the index.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True)  # fmt: skip
    deps = tmp_path / "deps"
    needed: dict[str, importlib.metadata.Distribution] = {}
    _closure("httpx", needed)
    assert not {"flask", "gevent", "psycopg"} & set(needed)
    for dist in needed.values():
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file)))
            if ".." in file.parts or not source.is_file():
                continue
            target = deps / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(str(deps) + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    code = (
        "import importlib.util, sys, pixstream.client, pixstream.collect\n"
        "assert pixstream.client.__file__.startswith(sys.prefix), pixstream.client.__file__\n"
        f"print([m for m in {SERVER_MODULES!r} if importlib.util.find_spec(m)])"
    )
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # not even installed
    helped = subprocess.run([str(venv / "bin" / "pixstream-collect"), "--help"],
                            capture_output=True, text=True, env=env)  # fmt: skip
    assert helped.returncode == 0 and "--out" in helped.stdout, helped.stderr
