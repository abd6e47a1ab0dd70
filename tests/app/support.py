"""Builders shared by the API and end-to-end tests: a tiny teacher, its archive, service settings."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from app.config import Settings
from rcekd.pipeline import train_and_save
from rcekd.train import TrainConfig

TOKEN = "test-token-" + "x" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def train_tiny_teacher(dataset_dir: Path, out: Path, dim: int = 16, epochs: int = 8) -> Path:
    """A small MF teacher on the tiny dataset, with trajectory checkpoints (HetComp reads them)."""
    train_and_save(
        dataset_dir,
        "mf",
        out,
        model_params={"dim": dim},
        config=TrainConfig(epochs=epochs, batch_size=64, lr=1e-2, eval_every=2, trajectory_every=2, device="cpu"),
    )
    return out


def archive(directory: Path, out: Path, include_trajectory: bool = True) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_file() and (include_trajectory or "trajectory" not in path.parts):
                tar.add(path, arcname=str(path.relative_to(directory)))
    return out


def settings_for(home: Path, data_dir: Path, broker_url: str = "memory://", **overrides: Any) -> Settings:
    return Settings(
        home=home,
        data_dir=data_dir,
        broker_url=broker_url,
        api_token=TOKEN,
        **overrides,
    )


def distill_spec(dataset: str, method: str = "rcekd", epochs: int = 4, **extra: Any) -> str:
    spec = {
        "dataset": dataset,
        "method": method,
        "student": {"arch": "mf", "dim": 8},
        "training": {"epochs": epochs, "batch_size": 64, "lr": 1e-2, "eval_every": 2, "device": None},
        **extra,
    }
    spec["training"].pop("device")
    return json.dumps(spec)


def post_teacher(client: TestClient, teacher: Path, spec: str, headers: dict | None = None) -> Any:
    with open(teacher, "rb") as handle:
        return client.post(
            "/distill",
            data={"spec": spec},
            files={"teacher": ("teacher.tar.gz", io.BytesIO(handle.read()))},
            headers=AUTH if headers is None else headers,
        )


def wait_for(
    client: TestClient, job_id: str, timeout_s: float = 300, states=("SUCCESS", "FAILED", "CANCELLED")
) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout_s} s: {job}")
