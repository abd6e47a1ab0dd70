"""The test package (``tests.rcekd`` mirrors ``rcekd``)."""

import rcekd  # noqa: F401  (first: it sets GOMP_SPINCOUNT before anything loads torch)
