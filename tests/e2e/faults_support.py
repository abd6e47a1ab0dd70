"""Processes the fault tests start, stop and kill: Celery workers, a Redis server, a uvicorn server.

Each is started by the test itself (own port, own process group), so killing or stopping it cannot
touch anything else on the machine.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
import uvicorn
from fastapi import FastAPI

ROOT = Path(__file__).resolve().parents[2]
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WorkerProcess:
    """A real Celery worker (prefork, one child) in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "rcekd"]
        command += ["--concurrency=1", "--loglevel=INFO", "-n", f"fault-{uuid.uuid4().hex[:8]}@%h", "--without-gossip"]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill(self) -> float:
        """SIGKILL the whole worker (main process and pool child) at once; returns when it is dead."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        return time.time()

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self, needle: str) -> list[tuple[float, str]]:
        """(Unix time, line) of each log line containing ``needle`` (Celery logs local time)."""
        found = []
        for line in self.text().splitlines():
            if needle in line and (stamp := LOG_TIME.match(line)):
                when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                found.append((when, line))
        return found


class RedisServer:
    """A throwaway ``redis-server`` on a free port: stop it to simulate an outage, start it again."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)


class ServerThread:
    """The app under a real uvicorn server in a thread, so that concurrent clients are really concurrent."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_until(condition: Any, timeout_s: float, what: str, every_s: float = 0.2) -> Any:
    """Poll ``condition()`` until it returns something truthy; that value, or AssertionError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every_s)
    raise AssertionError(f"not within {timeout_s} s: {what}")
