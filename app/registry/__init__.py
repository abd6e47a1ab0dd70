"""The registry: datasets, jobs and models in SQLAlchemy (SQLite by default, PostgreSQL in deployment).

``schema``: tables, job states, engines; ``session``: transactions; ``jobs``: the job state machine and
leases; ``recovery``: lost messages and revived jobs; ``store``: the ``Registry`` (datasets, models, and
the job operations it inherits).
"""

from app.registry.recovery import REVIVABLE
from app.registry.schema import (
    ALLOWED_FROM,
    TERMINAL,
    Base,
    Dataset,
    InvalidTransition,
    Job,
    JobState,
    Model,
    NotFound,
    create_schema,
    make_engine,
    spec_hash,
    utcnow,
)
from app.registry.store import Registry

__all__ = [
    "ALLOWED_FROM",
    "REVIVABLE",
    "TERMINAL",
    "Base",
    "Dataset",
    "InvalidTransition",
    "Job",
    "JobState",
    "Model",
    "NotFound",
    "Registry",
    "create_schema",
    "make_engine",
    "spec_hash",
    "utcnow",
]
