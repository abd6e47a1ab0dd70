"""Celery workers: they run the service's jobs (``rcekd.jobs``) and report progress to the registry."""

import rcekd  # noqa: F401  (first: it sets GOMP_SPINCOUNT before anything loads torch)
