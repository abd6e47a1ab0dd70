"""Celery workers: they run the service's jobs (``rcekd.jobs``) and report progress to the registry."""
