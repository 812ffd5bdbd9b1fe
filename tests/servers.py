"""Real processes for tests: `braid-server` on free ports and a webhook receiver that records deliveries."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEV_KEY, DEV_SECRET = "devkey", "secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A `braid-server` child process; its log goes to a file so a failing test can show it."""

    port: int
    proc: subprocess.Popen
    log_path: Path
    api_key: str = DEV_KEY
    api_secret: str = DEV_SECRET

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    tmp_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    dev: bool = True,
    wait_ready: bool = True,
) -> ServerProcess:
    """Start `braid-server` (`--dev` unless told otherwise) and wait until it answers /readyz."""
    port = free_port()
    log_path = tmp_dir / f"braid-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "braid.server", *(["--dev"] if dev else []), "--port", str(port), *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
        )
    server = ServerProcess(port=port, proc=proc, log_path=log_path)
    if not wait_ready:
        return server
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"braid-server exited with {proc.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(server.http_url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"braid-server not ready within {timeout}s:\n{server.log()}")


@dataclass
class Delivery:
    body: str
    authorization: str
    content_type: str

    @property
    def event(self) -> dict:
        return json.loads(self.body)


@dataclass
class WebhookSink:
    """A threaded HTTP receiver: works whatever event loop a test runs."""

    server: ThreadingHTTPServer
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/webhook"

    def for_room(self, room: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.event.get("room", {}).get("name") == room]

    def wait_for(self, predicate, timeout: float = 10.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                matched = [d for d in self.deliveries if predicate(d)]
            if matched or time.monotonic() > deadline:
                return matched
            time.sleep(0.05)


def start_webhook_sink(port: int = 0) -> WebhookSink:
    """A receiver on `port` (a free one by default; a given one lets a test bring a receiver "back")."""
    sink: WebhookSink

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length).decode()
            with sink.lock:
                sink.deliveries.append(
                    Delivery(body, self.headers.get("Authorization", ""), self.headers.get("Content-Type", ""))
                )
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    sink = WebhookSink(server=httpd)
    threading.Thread(target=httpd.serve_forever, daemon=True, name="webhook-sink").start()
    return sink


@dataclass
class RedisProcess:
    """A private `redis-server` on a free port, so tests can stop and restart it."""

    port: int
    dir: Path
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "RedisProcess":
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def start_redis(tmp_dir: Path) -> RedisProcess:
    return RedisProcess(port=free_port(), dir=tmp_dir).start()
