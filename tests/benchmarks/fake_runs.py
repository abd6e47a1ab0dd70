"""A quality benchmark's run record with made-up metrics, for the tests of its bookkeeping."""

from __future__ import annotations

from typing import Any


def quality_run(variant: str, seed: int, ndcg: float, **extra: Any) -> dict[str, Any]:
    """Test, paper-protocol and validation metrics derived from one NDCG@20 (so tables are checkable)."""
    block = {"recall@10": ndcg * 2, "ndcg@10": ndcg / 2, "recall@20": ndcg * 3, "ndcg@20": ndcg}
    return {
        "variant": variant,
        "seed": seed,
        "metrics": {"test": block, "test_paper": block, "valid": block},
        "seconds_per_epoch_train": 1.0,
        "best_epoch": 10,
        **extra,
    }
