"""The deployment files, checked without Docker: docker-compose.yml and the Dockerfile must describe
services that this repository can actually run.

Every ``RCEKD_*`` variable they set is a Settings field (and the set validates), every command they run
is installed here and its module imports, the image installs torch's CPU build before the project and
runs as a non-root user, and everything it COPYs exists and is not excluded by .dockerignore.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVICES = ("redis", "postgres", "api", "worker")
APP_SERVICES = ("api", "worker")
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}
COMPOSE_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
# imports a ``module:attribute`` (uvicorn) or a Celery app module (celery -A) and describes it
PROBE = """
import importlib, json, sys
kind, target = sys.argv[1], sys.argv[2]
if kind == "asgi":
    module_name, _, attribute = target.partition(":")
    app = getattr(importlib.import_module(module_name), attribute)
    paths, routes = set(app.openapi()["paths"]), list(app.routes)
    while routes:  # routes hidden from the schema too (FastAPI may wrap included routers)
        route = routes.pop()
        paths.add(getattr(route, "path", None) or "")
        routes += getattr(getattr(route, "original_router", None), "routes", [])
    print(json.dumps({"paths": sorted(paths)}))
else:
    from celery import Celery
    module = importlib.import_module(target)
    named = [getattr(module, name, None) for name in ("app", "celery")]
    apps = [value for value in named + list(vars(module).values()) if isinstance(value, Celery)]
    print(json.dumps({"queue": apps[0].conf.task_default_queue if apps else None}))
"""


def interpolate(value: str) -> str:
    """Compose's variable substitution with nothing set: defaults, and a placeholder for required ones."""

    def substitute(match: re.Match[str]) -> str:
        op, arg = match["op"] or "", match["arg"] or ""
        return arg if op.endswith("-") else f"placeholder-{match['name'].lower()}" if op.endswith("?") else ""

    return COMPOSE_VARIABLE.sub(substitute, value).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, whether written as a mapping or as KEY=VALUE items."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def named_volumes(service: dict[str, Any]) -> dict[str, str]:
    """target → source of a service's volumes (short ``source:target[:mode]`` or long syntax)."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = interpolate(volume).split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        mounts[target] = source
    return mounts


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}".strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, arguments = pending.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def command_argv(arguments: str) -> list[str]:
    """A CMD/command in exec form (JSON list) or shell form."""
    return json.loads(arguments) if arguments.lstrip().startswith("[") else shlex.split(arguments)


def probe(kind: str, target: str, tmp_path: Path) -> dict[str, Any]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RCEKD_")}
    env |= {"RCEKD_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, kind, target], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"importing {target} failed:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_command(argv: list[str], tmp_path: Path) -> dict[str, Any]:
    """The executable is an installed console script that runs, and the module it is given exists and imports."""
    executable = BIN / argv[0]
    assert executable.is_file(), f"{argv[0]} is not installed in {BIN}"
    version = subprocess.run([str(executable), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0, f"{argv[0]} --version failed: {version.stderr[-2000:]}"
    if argv[0] == "uvicorn":
        target = argv[1]
        module = target.partition(":")[0]
        assert module == "app.main" and target == "app.main:app"
        assert (ROOT / "app" / "main.py").is_file(), "app/main.py (the API) does not exist"
        return probe("asgi", target, tmp_path)
    if argv[0] == "celery":
        module = argv[argv.index("-A") + 1]
        assert module == "worker.celery_app"
        assert (ROOT / "worker" / "celery_app.py").is_file(), "worker/celery_app.py does not exist"
        return probe("celery", module, tmp_path)
    raise AssertionError(f"unexpected command {argv}")


# docker-compose.yml
def test_the_four_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert set(SERVICES) <= set(services)


@pytest.mark.parametrize("name", ["redis", "postgres"])
def test_backing_services_are_healthchecked_and_private(services: dict[str, dict[str, Any]], name: str) -> None:
    assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "ports" not in services[name], f"{name} must not be published"


def test_redis_is_checked_with_ping(services: dict[str, dict[str, Any]]) -> None:
    test = services["redis"]["healthcheck"]["test"]
    assert "redis-cli" in test and "ping" in test


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_wait_for_healthy_backends(services: dict[str, dict[str, Any]], name: str) -> None:
    depends = services[name]["depends_on"]
    assert isinstance(depends, dict), "depends_on needs conditions, not a list"
    for backend in ("redis", "postgres"):
        assert depends[backend]["condition"] == "service_healthy"


def test_api_and_worker_share_the_artifacts_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    api, worker = (named_volumes(services[name]) for name in APP_SERVICES)
    shared = {target for target, source in api.items() if source == "artifacts" and worker.get(target) == "artifacts"}
    assert shared, "api and worker must mount the `artifacts` volume at the same path"
    assert "artifacts" in compose["volumes"] and "pgdata" in compose["volumes"]
    for name in APP_SERVICES:
        assert environment(services[name])["RCEKD_HOME"] in shared, "RCEKD_HOME must be the shared volume"
        assert any(target == "/datasets" for target in named_volumes(services[name]))


def test_api_and_worker_run_the_same_image(services: dict[str, dict[str, Any]]) -> None:
    api, worker = services["api"], services["worker"]
    assert api.get("build") and api.get("image") == worker.get("image")
    assert environment(api) == environment(worker)


@pytest.mark.parametrize("name", APP_SERVICES)
def test_environment_is_made_of_settings(services: dict[str, dict[str, Any]], name: str, tmp_path: Path) -> None:
    env = environment(services[name])
    fields = {f"RCEKD_{field.upper()}": field for field in Settings.model_fields}
    rcekd = {key: value for key, value in env.items() if key.startswith("RCEKD_")}
    assert set(rcekd) <= set(fields), f"not settings: {sorted(set(rcekd) - set(fields))}"
    assert {"RCEKD_BROKER_URL", "RCEKD_DATABASE_URL", "RCEKD_API_TOKEN", "RCEKD_HOME"} <= set(rcekd)
    assert "RCEKD_API_TOKEN:?" in services[name]["environment"]["RCEKD_API_TOKEN"], "the token must be required"
    # the values validate (paths that only exist in the container aside)
    values = {fields[key]: interpolate(value) for key, value in rcekd.items() if key not in ("RCEKD_DATA_DIR",)}
    settings = Settings(**(values | {"home": tmp_path}))
    assert settings.broker_url.startswith("redis://") and settings.result_backend == settings.broker_url
    assert settings.database_url.startswith("postgresql+psycopg://")


def test_api_is_published_and_healthchecked(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]
    assert "8000:8000" in [str(port) for port in api["ports"]]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])


def test_worker_command_runs_here(services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    argv = command_argv(services["worker"]["command"])
    assert argv[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert "--concurrency=1" in argv
    described = check_command(argv, tmp_path)
    assert argv[argv.index("-Q") + 1] == described["queue"], "the worker must consume the queue tasks are sent to"
    assert services["worker"]["deploy"]["replicas"] >= 1


def test_api_command_runs_here_and_serves_healthz(services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    command = services["api"].get("command")
    argv = command_argv(command) if command else command_argv(dict(dockerfile())["CMD"])
    assert argv[0] == "uvicorn"
    assert "/healthz" in check_command(argv, tmp_path)["paths"]


# Dockerfile
def test_base_image_is_python_311() -> None:
    assert dockerfile()[0][0] == "FROM"
    assert re.fullmatch(r"python:3\.11[\w.-]*", dockerfile()[0][1].split()[0])


def test_torch_cpu_is_installed_before_the_project() -> None:
    runs = [arguments for keyword, arguments in dockerfile() if keyword == "RUN"]
    torch = [i for i, arguments in enumerate(runs) if "torch==" in arguments]
    project = [i for i, arguments in enumerate(runs) if re.search(r"pip install(\s+-\S+)*\s+\.(\s|$)", arguments)]
    assert torch and project and torch[0] < project[0], "torch (CPU) must be installed before `pip install .`"
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch[0]]
    pinned = re.search(r"torch==([\w.+]+)", runs[torch[0]])[1]
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    torch_requirement = next(Requirement(d) for d in dependencies if Requirement(d).name == "torch")
    assert torch_requirement.specifier.contains(pinned), f"torch=={pinned} is outside {torch_requirement}"


def test_runs_as_a_non_root_user() -> None:
    users = [arguments.split(":")[0] for keyword, arguments in dockerfile() if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_exposes_the_api_port() -> None:
    exposed = [port for keyword, arguments in dockerfile() if keyword == "EXPOSE" for port in arguments.split()]
    assert "8000" in [port.split("/")[0] for port in exposed]


def test_cmd_is_the_api() -> None:
    argv = command_argv(dict(dockerfile())["CMD"])
    assert argv[:2] == ["uvicorn", "app.main:app"] and "0.0.0.0" in argv and "8000" in argv


def test_everything_copied_exists_and_is_in_the_build_context() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    copies = [arguments for keyword, arguments in dockerfile() if keyword in ("COPY", "ADD")]
    assert copies
    for arguments in copies:
        parts = [part for part in command_argv(arguments) if not part.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
            assert Path(source).parts[0] not in ignored, f"COPY {source}: excluded by .dockerignore"
