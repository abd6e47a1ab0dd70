"""Service settings, read from ``RCEKD_*`` environment variables and validated at start-up.

A bad value stops the API or the worker before it touches a job, with the variable's name in the
message, instead of failing half-way through a training run.

Defaults give the *embedded* mode (no server needed): the registry, the Celery broker and the result
backend are SQLite files under ``home``. ``docker compose`` sets Redis and PostgreSQL URLs instead.

Authentication (secure by default): mutating endpoints need ``RCEKD_API_TOKEN``. Without one,

* in embedded mode a random token is generated at start-up (``token_generated`` is True; the API
  prints it once), so a laptop demo works without setup and is still not open to the LAN;
* with a real broker (Redis, ...) start-up fails: replicas would each invent a different token;
* ``RCEKD_ALLOW_ANONYMOUS=true`` opens mutating endpoints explicitly (tests, trusted networks).

A token set in the environment always wins over ``allow_anonymous``.

Fault tolerance: a worker renews its job's lease every ``heartbeat_s``; the API's reaper (every
``lease_s / 3``) re-queues a job whose lease ran out, up to ``max_attempts``, and the retry resumes
from the checkpoint written every ``checkpoint_every`` epochs. ``test_crash_on_job`` is a test hook
only (a worker that kills itself on a matching job), off unless set.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

GIB = 1024**3
# brokers the worker and API may use; memory:// is Celery's in-process broker (tests)
BROKER_SCHEMES = ("sqla+sqlite", "sqla+postgresql", "redis", "rediss", "amqp", "pyamqp", "memory")
DATABASE_DRIVERS = ("sqlite", "postgresql")
MIN_TOKEN_CHARS = 8
TRAIN_NAMES = ("train.txt", "train.txt.gz", "train", "train.gz")  # as rcekd.data finds them


class Settings(BaseSettings):
    """Everything the API and the workers must agree on; one instance per process."""

    model_config = SettingsConfigDict(env_prefix="RCEKD_", extra="forbid", validate_default=True)

    data_dir: Path | None = Field(
        None, description="a dataset directory, or a directory of them: registered as builtin datasets"
    )
    home: Path = Field(Path("runs/service"), description="root of artifacts, uploads and SQLite files")
    database_url: str | None = Field(None, description="registry; default sqlite:///<home>/registry.db")
    broker_url: str | None = Field(None, description="Celery broker; default sqla+sqlite:///<home>/broker.db")
    result_backend: str | None = Field(None, description="default db+sqlite:///<home>/results.db, or the Redis broker")
    api_token: SecretStr | None = Field(None, description="bearer token for mutating endpoints")
    allow_anonymous: bool = Field(False, description="without a token: open mutating endpoints to anyone")
    max_upload_bytes: int = Field(2 * GIB, gt=0)
    port: int = Field(8000, ge=1, le=65535)
    host: str = Field("127.0.0.1", min_length=1)
    task_time_limit_s: int = Field(6 * 3600, gt=0, description="hard limit of one distillation task")
    visibility_timeout_s: int | None = Field(
        None, gt=0, description="Redis redelivery delay; must exceed task_time_limit_s (default: +1 h)"
    )
    heartbeat_s: int = Field(10, gt=0, description="how often a running task renews its lease")
    lease_s: int = Field(60, gt=0, description="a job whose lease is this old is re-queued by the reaper")
    max_attempts: int = Field(3, ge=1, le=100)
    checkpoint_every: int = Field(5, ge=1, description="epochs between training checkpoints (a retry resumes there)")
    republish_after_s: int = Field(
        900, gt=0, description="a QUEUED job unclaimed this long is published again (a lost message is replaced)"
    )
    test_crash_on_job: str | None = Field(
        None,
        description="TEST HOOK, never set in production: a worker whose job spec (sorted-key JSON) contains this "
        "text SIGKILLs itself at the first epoch, as an out-of-memory kill would (fault-tolerance tests)",
    )
    default_index: str = Field("flat", min_length=1, pattern=r"^[A-Za-z0-9_,.]+$")
    latency_sample_users: int = Field(200, ge=1)

    # set when the token was generated here (embedded mode): the API prints it
    _token_generated: bool = False

    @field_validator("home", mode="after")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        """Absolute, so an API and a worker started from other directories share the same files."""
        return home.expanduser().resolve()

    @field_validator("data_dir", mode="after")
    @classmethod
    def _existing_data_dir(cls, data_dir: Path | None) -> Path | None:
        if data_dir is None:
            return None
        data_dir = data_dir.expanduser().resolve()
        if not data_dir.is_dir():
            raise ValueError(f"RCEKD_DATA_DIR={data_dir} is not a directory")
        return data_dir

    @field_validator("database_url", mode="after")
    @classmethod
    def _known_database(cls, url: str | None) -> str | None:
        if url is None:
            return None
        try:
            backend = make_url(url).get_backend_name()
        except ArgumentError as error:
            raise ValueError(f"RCEKD_DATABASE_URL is not a database URL: {error}") from None
        if backend not in DATABASE_DRIVERS:
            raise ValueError(f"RCEKD_DATABASE_URL must be SQLite or PostgreSQL, not {backend!r}")
        return url

    @field_validator("broker_url", mode="after")
    @classmethod
    def _known_broker(cls, url: str | None) -> str | None:
        if url is not None and url.partition("://")[0] not in BROKER_SCHEMES:
            raise ValueError(f"RCEKD_BROKER_URL must start with one of {', '.join(BROKER_SCHEMES)}: {url!r}")
        return url

    @field_validator("api_token", mode="after")
    @classmethod
    def _strong_token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None:
            value = token.get_secret_value()
            if len(value) < MIN_TOKEN_CHARS or value != value.strip():
                raise ValueError(f"RCEKD_API_TOKEN needs at least {MIN_TOKEN_CHARS} characters and no spaces")
        return token

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        """Fill the URLs left unset and check the settings that only make sense together."""
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.home / 'registry.db'}"
        if self.broker_url is None:
            self.broker_url = f"sqla+sqlite:///{self.home / 'broker.db'}"
        if self.result_backend is None:
            redis = self.broker_url.startswith(("redis://", "rediss://"))
            self.result_backend = self.broker_url if redis else f"db+sqlite:///{self.home / 'results.db'}"
        if self.visibility_timeout_s is None:
            self.visibility_timeout_s = self.task_time_limit_s + 3600
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError(
                f"RCEKD_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must exceed RCEKD_TASK_TIME_LIMIT_S "
                f"({self.task_time_limit_s}): Redis would hand a running task to a second worker"
            )
        if self.lease_s <= self.heartbeat_s:
            raise ValueError(
                f"RCEKD_LEASE_S ({self.lease_s}) must exceed RCEKD_HEARTBEAT_S ({self.heartbeat_s}): "
                "a live worker's lease would expire between two heartbeats"
            )
        if self.api_token is None and not self.allow_anonymous:
            if not self.is_embedded and not self.broker_url.startswith("memory://"):
                raise ValueError("RCEKD_API_TOKEN is required with a shared broker (or set RCEKD_ALLOW_ANONYMOUS=true)")
            self.api_token = SecretStr(secrets.token_urlsafe(32))
            self._token_generated = True
        return self

    @property
    def token_generated(self) -> bool:
        """True when ``api_token`` was made up at start-up: the API should print it once."""
        return self._token_generated

    @property
    def reap_every_s(self) -> float:
        """How often the API's reaper looks for expired leases: a third of a lease."""
        return self.lease_s / 3

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def uploads_dir(self) -> Path:
        return self.home / "uploads"

    @property
    def is_embedded(self) -> bool:
        """SQLite broker: no server; ``make run`` starts a worker process beside the API."""
        return bool(self.broker_url) and self.broker_url.startswith("sqla+sqlite")

    @property
    def dataset_dirs(self) -> list[Path]:
        """The builtin datasets: ``data_dir`` itself if it holds a train file, else its sub-directories that do."""
        if self.data_dir is None:
            return []
        if _has_train(self.data_dir):
            return [self.data_dir]
        return sorted(child for child in self.data_dir.iterdir() if child.is_dir() and _has_train(child))


def _has_train(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TRAIN_NAMES)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once (``get_settings.cache_clear()`` re-reads the environment)."""
    return Settings()


def ensure_dirs(settings: Settings) -> None:
    """Create ``home``, the artifacts and the uploads directories (idempotent)."""
    for directory in (settings.home, settings.artifacts_dir, settings.uploads_dir):
        directory.mkdir(parents=True, exist_ok=True)
