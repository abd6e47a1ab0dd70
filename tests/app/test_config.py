"""Settings: embedded defaults, environment overrides, and clear refusals of values that cannot work."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import GIB, Settings, ensure_dirs, get_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No RCEKD_* from the caller (the Makefile exports RCEKD_DATA_DIR), and a scratch working directory."""
    for name in list(os.environ):
        if name.startswith("RCEKD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_defaults_are_the_embedded_mode(tmp_path: Path) -> None:
    settings = Settings()
    home = tmp_path / "runs" / "service"
    assert settings.home == home and settings.home.is_absolute()
    assert settings.database_url == f"sqlite:///{home}/registry.db"
    assert settings.broker_url == f"sqla+sqlite:///{home}/broker.db"
    assert settings.result_backend == f"db+sqlite:///{home}/results.db"
    assert settings.is_embedded
    assert (settings.artifacts_dir, settings.uploads_dir) == (home / "artifacts", home / "uploads")
    assert settings.data_dir is None and settings.dataset_dirs == []
    assert (settings.host, settings.port, settings.max_upload_bytes) == ("127.0.0.1", 8000, 2 * GIB)
    assert (settings.task_time_limit_s, settings.heartbeat_s, settings.lease_s, settings.max_attempts) == (
        6 * 3600,
        10,
        60,
        3,
    )
    assert settings.visibility_timeout_s > settings.task_time_limit_s
    assert (settings.default_index, settings.latency_sample_users, settings.allow_anonymous) == ("flat", 200, False)


def test_embedded_mode_generates_a_token_and_says_so() -> None:
    first, second = Settings(), Settings()
    assert first.token_generated and first.api_token is not None
    assert len(first.api_token.get_secret_value()) >= 32
    assert first.api_token.get_secret_value() != second.api_token.get_secret_value()
    assert "*" in repr(first.api_token) and first.api_token.get_secret_value() not in repr(first)


def test_anonymous_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RCEKD_ALLOW_ANONYMOUS", "true")
    settings = Settings()
    assert settings.api_token is None and not settings.token_generated


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = tmp_path / "datasets"
    for name in ("citeulike", "gowalla"):
        (data / name).mkdir(parents=True)
        (data / name / "train.txt.gz").write_bytes(b"")
    (data / "notes").mkdir()
    env = {
        "RCEKD_HOME": str(tmp_path / "srv"),
        "RCEKD_DATA_DIR": str(data),
        "RCEKD_DATABASE_URL": "postgresql+psycopg://u:p@db:5432/rcekd",
        "RCEKD_BROKER_URL": "redis://redis:6379/0",
        "RCEKD_API_TOKEN": "s3cret-token",
        "RCEKD_PORT": "9000",
        "RCEKD_HOST": "0.0.0.0",
        "RCEKD_MAX_UPLOAD_BYTES": "1048576",
        "RCEKD_TASK_TIME_LIMIT_S": "100",
        "RCEKD_VISIBILITY_TIMEOUT_S": "101",
        "RCEKD_HEARTBEAT_S": "2",
        "RCEKD_LEASE_S": "7",
        "RCEKD_MAX_ATTEMPTS": "5",
        "RCEKD_DEFAULT_INDEX": "hnsw",
        "RCEKD_LATENCY_SAMPLE_USERS": "50",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = get_settings()
    assert get_settings() is settings  # read once per process
    assert settings.home == tmp_path / "srv" and settings.artifacts_dir == tmp_path / "srv" / "artifacts"
    assert settings.data_dir == data and settings.dataset_dirs == [data / "citeulike", data / "gowalla"]
    assert settings.database_url == env["RCEKD_DATABASE_URL"]
    assert settings.broker_url == settings.result_backend == "redis://redis:6379/0"  # redis broker → redis results
    assert not settings.is_embedded and not settings.token_generated
    assert settings.api_token is not None and settings.api_token.get_secret_value() == "s3cret-token"
    assert (settings.port, settings.host, settings.max_upload_bytes) == (9000, "0.0.0.0", 1048576)
    assert (settings.task_time_limit_s, settings.visibility_timeout_s) == (100, 101)
    assert (settings.heartbeat_s, settings.lease_s, settings.max_attempts) == (2, 7, 5)
    assert (settings.default_index, settings.latency_sample_users) == ("hnsw", 50)


def test_a_dataset_directory_is_its_own_single_dataset(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("0 1\n")
    assert Settings(data_dir=tmp_path).dataset_dirs == [tmp_path]


def test_an_explicit_result_backend_wins() -> None:
    settings = Settings(broker_url="redis://r:6379/0", result_backend="redis://r:6379/1", api_token="long-enough")
    assert settings.result_backend == "redis://r:6379/1"


def test_ensure_dirs(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "a" / "b")
    ensure_dirs(settings)
    ensure_dirs(settings)  # idempotent
    assert settings.artifacts_dir.is_dir() and settings.uploads_dir.is_dir()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("RCEKD_PORT", "70000", "port"),
        ("RCEKD_PORT", "eighty", "port"),
        ("RCEKD_MAX_UPLOAD_BYTES", "0", "max_upload_bytes"),
        ("RCEKD_HEARTBEAT_S", "-1", "heartbeat_s"),
        ("RCEKD_MAX_ATTEMPTS", "0", "max_attempts"),
        ("RCEKD_LATENCY_SAMPLE_USERS", "0", "latency_sample_users"),
        ("RCEKD_DEFAULT_INDEX", "flat; rm -rf", "default_index"),
        ("RCEKD_DATA_DIR", "/no/such/directory", "RCEKD_DATA_DIR=/no/such/directory is not a directory"),
        ("RCEKD_DATABASE_URL", "mysql://u@h/db", "must be SQLite or PostgreSQL"),
        ("RCEKD_DATABASE_URL", "not a url", "not a database URL"),
        ("RCEKD_BROKER_URL", "kafka://k:9092", "RCEKD_BROKER_URL must start with"),
        ("RCEKD_API_TOKEN", "short", "at least 8 characters"),
        ("RCEKD_ALLOW_ANONYMOUS", "perhaps", "allow_anonymous"),
    ],
)
def test_invalid_values_are_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="prot"):
        Settings(prot=8000)  # type: ignore[call-arg]


@pytest.mark.parametrize("visibility", ["3600", "3599"])
def test_visibility_timeout_must_exceed_the_task_time_limit(monkeypatch: pytest.MonkeyPatch, visibility: str) -> None:
    monkeypatch.setenv("RCEKD_TASK_TIME_LIMIT_S", "3600")
    monkeypatch.setenv("RCEKD_VISIBILITY_TIMEOUT_S", visibility)
    with pytest.raises(ValidationError, match=r"VISIBILITY_TIMEOUT_S \(\d+\) must exceed RCEKD_TASK_TIME_LIMIT_S"):
        Settings()


def test_the_default_visibility_timeout_follows_the_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RCEKD_TASK_TIME_LIMIT_S", "86400")
    assert Settings().visibility_timeout_s > 86400


def test_a_lease_must_outlast_a_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RCEKD_HEARTBEAT_S", "30")
    monkeypatch.setenv("RCEKD_LEASE_S", "30")
    with pytest.raises(ValidationError, match=r"RCEKD_LEASE_S \(30\) must exceed RCEKD_HEARTBEAT_S"):
        Settings()


def test_a_shared_broker_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RCEKD_BROKER_URL", "redis://redis:6379/0")
    with pytest.raises(ValidationError, match="RCEKD_API_TOKEN is required"):
        Settings()
    monkeypatch.setenv("RCEKD_ALLOW_ANONYMOUS", "1")
    assert Settings().api_token is None
