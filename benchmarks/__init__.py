"""Benchmarks: each writes benchmarks/results/<name>.json, .md and .png."""

import rcekd  # noqa: F401  (first: it sets GOMP_SPINCOUNT before anything loads torch)
