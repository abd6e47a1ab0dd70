"""Shared helpers for benchmarks: where the data is, and how results are written (the contract)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def data_dir(name: str) -> Path:
    """A dataset under $RCEKD_DATA_ROOT (default ../shared/data beside the repository)."""
    return Path(os.environ.get("RCEKD_DATA_ROOT", DEFAULT_DATA)) / name


def code_version() -> str:
    """The commit the benchmark ran on (``+dirty`` with uncommitted changes outside
    benchmarks/results), so results trace to code."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # results written by an earlier benchmark in the same tree are not code
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    return {
        "code": code_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine while measuring
    }


def write_results(name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """benchmarks/results/<name>.json and .md, as DESIGN.md's benchmark contract says."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    md_path.write_text(markdown)
    return json_path, md_path
