"""The service around the science: FastAPI control plane, registry, serving."""

import rcekd  # noqa: F401  (first: it sets GOMP_SPINCOUNT before anything loads torch)
