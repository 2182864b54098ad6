"""Release id: /healthz ``release``/``version`` and the ``X-Release`` header on every response."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import httpx

import xagent
from conftest import Stack, base_env
from xagent.release import release_id

SRC = Path(xagent.__file__).resolve().parent.parent


def test_release_id_is_the_directory_of_the_venv(tmp_path: Path) -> None:
    releases = tmp_path / "opt" / "xagent" / "releases"
    venv = releases / "20261127T120000-abc123" / "venv"
    venv.mkdir(parents=True)
    current = tmp_path / "opt" / "xagent" / "current"
    current.symlink_to(releases / "20261127T120000-abc123")
    assert release_id(str(venv), "/usr") == "20261127T120000-abc123"
    # started through the `current` symlink: still the release it really runs
    assert release_id(str(current / "venv"), "/usr") == "20261127T120000-abc123"
    assert release_id("/usr", "/usr") == "dev"  # no venv at all


def test_interpreter_started_through_current_reports_its_release(tmp_path: Path) -> None:
    releases = tmp_path / "releases"
    venv = releases / "r42" / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(venv)], check=True)
    current = tmp_path / "current"
    current.symlink_to(releases / "r42")
    code = (
        f"import sys; sys.path.insert(0, {str(SRC)!r}); "
        "from xagent.release import RELEASE; print(RELEASE)"
    )
    out = subprocess.run(
        [str(current / "venv" / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "r42"


def test_healthz_and_every_response_name_the_release(
    session_db: str,
    queue_name: str,
    tmp_path: Path,
    stack_factory: Callable[[dict[str, str]], Stack],
) -> None:
    stack = stack_factory(base_env(session_db, queue_name, tmp_path / "models"))
    base_url = stack.web()
    # the web runs from the same venv as the tests
    expected = Path(sys.prefix).resolve().parent.name

    resp = httpx.get(f"{base_url}/healthz")
    body = resp.json()
    assert body["status"] == "ok"
    assert body["release"] == expected
    assert body["version"] == version("xagent")
    assert resp.headers["x-release"] == expected

    for method, path in [("GET", "/readyz"), ("GET", "/no-such-page"), ("POST", "/runs")]:
        resp = httpx.request(method, f"{base_url}{path}", json={} if method == "POST" else None)
        assert resp.status_code in {200, 404, 422}, (path, resp.status_code)
        assert resp.headers.get("x-release") == expected, (path, dict(resp.headers))
