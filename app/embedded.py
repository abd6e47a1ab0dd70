"""``make run``: the whole service on one machine with no server to install.

Starts uvicorn and a real Celery worker process (SQLite broker and result backend unless
RCEKD_BROKER_URL says otherwise), then, on first start, trains a demo teacher, distils it with
RCE-KD, activates the student and prints the URLs and the teacher-vs-student comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from app.config import Settings

#: demo settings per dataset: the README's CiteULike teacher, or a quick one on the synthetic data
DEMO_TEACHERS: dict[str, dict[str, Any]] = {
    "citeulike": {"model": {"arch": "mf", "dim": 400, "params": {"sparse": False}}, "training": {"weight_decay": 1e-3}},
    "default": {"model": {"arch": "mf", "dim": 64}, "training": {"epochs": 60}},
}


def start_processes(settings: Settings, env: dict[str, str]) -> list[subprocess.Popen]:
    python = sys.executable
    worker = [python, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "rcekd", "--concurrency=1"]
    worker += ["--loglevel=WARNING", "--hostname", f"rcekd-embedded-{os.getpid()}@%h"]
    api = [python, "-m", "uvicorn", "app.main:app", "--host", settings.host, "--port", str(settings.port)]
    api += ["--log-level", "warning", "--no-access-log"]  # the launcher prints progress itself
    return [subprocess.Popen(worker, env=env), subprocess.Popen(api, env=env)]


def wait_ready(client: httpx.Client, processes: list[subprocess.Popen], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise SystemExit("a service process exited during start-up; see its log above")
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the API did not answer within {timeout_s:.0f} s")


def follow(client: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    """Poll a job to its end, printing one line per epoch reported."""
    last = None
    while job["state"] not in ("SUCCESS", "FAILED", "CANCELLED"):
        time.sleep(2)
        job = client.get(f"/jobs/{job['id']}").json()
        progress = job.get("progress") or {}
        line = _progress_line(job, progress)
        if line != last:
            print(line, flush=True)
            last = line
    if job["state"] != "SUCCESS":
        raise SystemExit(f"job {job['id']} ended {job['state']}: {job.get('error')}")
    return job


def _progress_line(job: dict[str, Any], progress: dict[str, Any]) -> str:
    if "epoch" not in progress:
        return f"  {job['kind']} job {job['id'][:8]}: {job['state']} {progress.get('stage', '')}"
    return (
        f"  {job['kind']} job {job['id'][:8]}: epoch {progress['epoch']}/{progress['max_epochs']} "
        f"loss {progress['loss']:.4g} best valid NDCG@10 {progress.get('best_ndcg', 0):.4f} "
        f"(epoch {progress.get('best_epoch')}) ETA {progress.get('eta_seconds', 0):.0f} s"
    )


def bootstrap(client: httpx.Client, dataset: str) -> None:
    """First start: teacher → RCE-KD student → activate; later starts find the active model."""
    models = client.get("/models", params={"dataset": dataset}).json()
    if any(m["active"] for m in models):
        return
    teacher_spec = DEMO_TEACHERS.get(dataset, DEMO_TEACHERS["default"])
    print(f"first start: training a demo teacher on {dataset} ({teacher_spec['model']})", flush=True)
    job = follow(client, _post(client, "/teachers", json={"dataset": dataset, **teacher_spec}))
    spec = {
        "dataset": dataset,
        "method": "rcekd",
        "student": {"arch": "mf", "dim": 20},
        "teacher_model": job["result_model_id"],
    }
    print("distilling a d=20 MF student with RCE-KD", flush=True)
    job = follow(client, _post(client, "/distill", data={"spec": json.dumps(spec)}))
    _post(client, f"/models/{job['result_model_id']}/activate")


def _post(client: httpx.Client, path: str, **kwargs: Any) -> dict[str, Any]:
    response = client.post(path, **kwargs)
    if response.status_code >= 400:
        raise SystemExit(f"POST {path}: {response.status_code} {response.text}")
    return response.json()


def print_comparison(client: httpx.Client) -> None:
    report = client.get("/compare", timeout=600).json()
    print(f"\n{'model':<28}{'NDCG@20':>9}{'Recall@20':>11}{'params':>12}{'serving MiB':>13}{'p50 ms':>9}{'p99 ms':>9}")
    for entry in report["models"]:
        metrics, latency = entry["metrics"], entry["model_only_ms"]
        print(
            f"{entry['name']:<28}{metrics['ndcg@20']:>9.4f}{metrics['recall@20']:>11.4f}{entry['n_parameters']:>12,}"
            f"{entry['serving_bytes'] / 2**20:>13.2f}{latency['p50']:>9.2f}{latency['p99']:>9.2f}"
        )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.embedded", description=__doc__)
    parser.add_argument("--no-demo", action="store_true", help="start the services only")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the children too, as Ctrl-C does
    env = dict(os.environ)
    env.setdefault("RCEKD_API_TOKEN", secrets.token_urlsafe(32))  # one token for both processes
    os.environ.update(env)
    settings = Settings()
    Path(settings.home).mkdir(parents=True, exist_ok=True)
    processes = start_processes(settings, env)
    base = f"http://{settings.host}:{settings.port}"
    headers = {"Authorization": f"Bearer {env['RCEKD_API_TOKEN']}"}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
            wait_ready(client, processes)
            dataset = client.get("/datasets").json()[0]["id"]
            if not args.no_demo:
                bootstrap(client, dataset)
                print_comparison(client)
            print(f"\nAPI {base}  docs {base}/docs  try: curl {base}/recommend/0?n=10")
            print(f"token for POST/DELETE: {env['RCEKD_API_TOKEN']}\nCtrl-C stops the service.", flush=True)
        while all(p.poll() is None for p in processes):
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
