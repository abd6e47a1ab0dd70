"""Issue 4's acceptance through the real service on CiteULike: teacher upload → RCE-KD student → compare.

For each teacher (runs/teachers/<name>, see benchmarks/teachers.py) this starts the API (uvicorn) and a
Celery worker process on the embedded SQLite broker, uploads the teacher as an artifact archive,
waits for the RCE-KD job, activates the student and reads ``/compare``; it runs ``rcekd distill``
with the same seed beside it, and loads ``/recommend`` with 16 concurrent clients for each model.

    python -m benchmarks.service_citeulike [--teachers citeulike-mf400 citeulike-hstu] [--seed 0]

Writes benchmarks/results/service_citeulike.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.config import Settings
from app.embedded import follow, start_processes, wait_ready
from benchmarks.common import RESULTS, code_version, data_dir, write_results

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "service-bench"


def archive(directory: Path, out: Path) -> Path:
    """The teacher's artifact without its training trajectory (RCE-KD does not read it)."""
    with tarfile.open(out, "w") as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_file() and "trajectory" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(directory)))
    return out


def load_test(base: str, model: str, users: list[str], clients: int, requests: int) -> dict[str, Any]:
    """``requests`` GET /recommend calls from ``clients`` threads, each with its own connection."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def client(worker: int) -> None:
        nonlocal errors
        rng = np.random.default_rng(worker)
        with httpx.Client(base_url=base, timeout=30) as http:
            for _ in range(requests // clients):
                user = users[rng.integers(len(users))]
                started = time.perf_counter()
                try:
                    ok = http.get(f"/recommend/{user}", params={"n": 20, "model": model}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    latencies.append(elapsed)
                    errors += not ok

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {"requests": len(latencies), "errors": errors, "clients": clients, "req_per_s": len(latencies) / wall,
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99}  # fmt: skip


def run_one(name: str, seed: int, port: int, load_requests: int) -> dict[str, Any]:
    teacher_dir = ROOT / "runs" / "teachers" / name
    home = RUNS / name
    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    env = {**os.environ, "RCEKD_HOME": str(home), "RCEKD_DATA_DIR": str(data_dir("citeulike")),
           "RCEKD_PORT": str(port), "RCEKD_API_TOKEN": token, "RCEKD_LATENCY_SAMPLE_USERS": "500",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    cli_out = RUNS / f"cli-{name}-s{seed}"
    cli = [sys.executable, "-m", "rcekd.cli", "distill", "--data", str(data_dir("citeulike"))]
    cli += ["--teacher", str(teacher_dir), "--method", "rcekd", "--dim", "20", "--seed", str(seed)]
    cli += ["--out", str(cli_out), "--overwrite", "--quiet"]
    # the same seed through the CLI, beside the service (skipped when a previous run left its result)
    cli_process = None if (cli_out / "manifest.json").is_file() else subprocess.Popen(cli, env=env)
    settings = Settings(home=home, data_dir=data_dir("citeulike"), port=port, api_token=token)
    processes = start_processes(settings, env)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=600) as client:
            wait_ready(client, processes)
            spec = {"dataset": "citeulike", "method": "rcekd", "student": {"arch": "mf", "dim": 20},
                    "training": {"seed": seed}}  # fmt: skip
            with open(archive(teacher_dir, home / "teacher.tar"), "rb") as handle:
                posted = client.post("/distill", data={"spec": json.dumps(spec)}, files={"teacher": handle})
            posted.raise_for_status()  # 200 with the finished job when a previous run did it already
            started = time.perf_counter()
            job = follow(client, posted.json())
            job_seconds = time.perf_counter() - started
            if posted.status_code == 200:
                finished, begun = job["finished_at"], job["started_at"]
                job_seconds = (_parse_time(finished) - _parse_time(begun)).total_seconds()
            models = {m["role"]: m for m in client.get("/models").json() if m["job_id"] == job["id"]}
            client.post(f"/models/{models['student']['id']}/activate").raise_for_status()
            ids = f"{models['teacher']['id']},{models['student']['id']}"
            compare = client.get("/compare", params={"models": ids}).json()["models"]
            n_users = next(d["n_users"] for d in client.get("/datasets").json() if d["id"] == "citeulike")
            users = [str(u) for u in range(0, n_users, 7)]
            load = {role: load_test(base, models[role]["id"], users, 16, load_requests) for role in models}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
    if cli_process is not None and cli_process.wait() != 0:
        raise SystemExit(f"rcekd distill failed for {name}")
    cli_manifest = json.loads((cli_out / "manifest.json").read_text())
    return {"teacher": name, "seed": seed, "job_seconds": job_seconds, "compare": compare, "load": load,
            "code": code_version(),
            "cli_ndcg@20": cli_manifest["metrics"]["test"]["ndcg@20"]}  # fmt: skip


def _parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# The service on CiteULike: teacher vs RCE-KD student (MF d=20)",
        "",
        "Command: `python -m benchmarks.service_citeulike`. Model-only latency: ONNX + FAISS + seen filter, "
        "one user per call, 500 sampled users; load: 16 concurrent HTTP clients on `GET /recommend`.",
        "",
    ]
    for row in rows:
        teacher, student = row["compare"]
        t, s = teacher["metrics"]["ndcg@20"], student["metrics"]["ndcg@20"]
        lines += [
            f"## {row['teacher']} → RCE-KD MF d=20 (seed {row['seed']}, job {row['job_seconds']:.0f} s)",
            "",
            f"Code: {row.get('code', 'unrecorded')}. {row.get('note', '')}",
            "",
            "| model | test NDCG@20 | parameters | serving bytes | model-only p50 / p99 ms "
            "| HTTP p50 / p99 ms (16 clients) | req/s | errors |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for entry in (teacher, student):
            load, model_only = row["load"][entry["role"]], entry["model_only_ms"]
            lines.append(
                f"| {entry['name']} | {entry['metrics']['ndcg@20']:.4f} | {entry['n_parameters']:,} | "
                f"{entry['serving_bytes']:,} | {model_only['p50']:.3f} / {model_only['p99']:.3f} | "
                f"{load['p50_ms']:.1f} / {load['p99_ms']:.1f} | {load['req_per_s']:.0f} | {load['errors']} |"
            )
        lines += [
            "",
            f"- student keeps **{s / t:.1%}** of the teacher's NDCG@20; serving bytes × "
            f"{student['serving_bytes'] / teacher['serving_bytes']:.3f}; model-only p50 × "
            f"{student['model_only_ms']['p50'] / teacher['model_only_ms']['p50']:.2f}",
            f"- NDCG@20 through the API {s:.6f}, `rcekd distill` with the same seed {row['cli_ndcg@20']:.6f} "
            f"(difference {abs(s - row['cli_ndcg@20']):.1e})",
            "",
        ]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        for entry in row["compare"]:
            label = f"{row['teacher']}:{entry['role']}"
            ndcg = entry["metrics"]["ndcg@20"]
            left.scatter(entry["model_only_ms"]["p50"], ndcg)
            left.annotate(label, (entry["model_only_ms"]["p50"], ndcg), fontsize=8)
            right.scatter(entry["serving_bytes"] / 2**20, ndcg)
            right.annotate(label, (entry["serving_bytes"] / 2**20, ndcg), fontsize=8)
    left.set(xlabel="model-only p50 (ms)", ylabel="test NDCG@20", title="quality vs latency")
    right.set(xlabel="serving files (MiB)", xscale="log", ylabel="test NDCG@20", title="quality vs size")
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a log axis
    figure.tight_layout()
    figure.savefig(RESULTS / "service_citeulike.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="*", default=["citeulike-mf400", "citeulike-hstu"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8231)
    parser.add_argument("--load-requests", type=int, default=4000)
    args = parser.parse_args(argv)
    previous = RESULTS / "service_citeulike.json"
    rows = {r["teacher"]: r for r in json.loads(previous.read_text())["runs"]} if previous.exists() else {}
    for name in args.teachers:
        rows[name] = run_one(name, args.seed, args.port, args.load_requests)
        ordered = list(rows.values())
        write_results("service_citeulike", {"runs": ordered}, markdown(ordered))
        plot(ordered)
    print(markdown(list(rows.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
