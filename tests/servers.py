"""Real processes for tests: `braid-server` on free ports and a webhook receiver that records deliveries."""

from __future__ import annotations

import json
import os
import random
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


# Ports handed to servers come from below the kernel's ephemeral range (32768-60999 on Linux): a port the kernel
# picked and we released is soon taken again by some client's outgoing connection, before the server binds it.
_TEST_PORTS = range(12000, 32000)
_handed_out: set[int] = set()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 free for both TCP and UDP, outside the ephemeral range, not handed out before."""
    rng = random.Random()
    for _ in range(500):
        port = rng.choice(_TEST_PORTS)
        if port in _handed_out:
            continue
        try:
            for sock_kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, sock_kind) as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def media_ports() -> dict[str, str]:
    """A free UDP port and ICE-TCP port for a media node (the defaults 7882/7881 would collide between tests)."""
    return {"BRAID_RTC__UDP_PORT": str(free_port(socket.SOCK_DGRAM)), "BRAID_RTC__TCP_PORT": str(free_port())}


def rtc_overrides(**extra) -> dict:
    """`rtc` config overrides for an in-process media node: free UDP and ICE-TCP ports."""
    return {"udp_port": free_port(socket.SOCK_DGRAM), "tcp_port": free_port(), **extra}


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
        return read_log(self.log_path)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        return terminate(self.proc, timeout)


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def terminate(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, then SIGKILL after `timeout` seconds; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


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
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **media_ports(), **(env or {})}
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


@dataclass
class TurnProcess:
    """coturn (`turnserver` from Debian) on 127.0.0.1 with `use-auth-secret`: UDP and TCP on `port`, TLS on
    `tls_port` with a self-signed certificate for 127.0.0.1 (`cert`), relaying to loopback peers."""

    port: int
    tls_port: int
    secret: str
    cert: Path
    proc: subprocess.Popen
    log_path: Path

    @property
    def urls(self) -> list[str]:
        return [f"turn:127.0.0.1:{self.port}?transport=udp", f"turn:127.0.0.1:{self.port}?transport=tcp",
                f"turns:127.0.0.1:{self.tls_port}?transport=tcp"]

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self) -> None:
        terminate(self.proc, 5)


def self_signed_certificate(tmp_dir: Path, name: str = "turn") -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1 / localhost, made with openssl."""
    cert, key = tmp_dir / f"{name}.crt", tmp_dir / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def start_turn(tmp_dir: Path, secret: str = "turn-test-secret") -> TurnProcess:
    port, tls_port = free_port(), free_port()
    cert, key = self_signed_certificate(tmp_dir)
    log_path = tmp_dir / f"turnserver-{port}.log"
    relay_base = 20000 + (port % 200) * 100  # a relay port block of its own, so parallel runs do not meet
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            ["turnserver", "-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={port}",
             f"--tls-listening-port={tls_port}", f"--alt-listening-port={free_port()}",
             f"--alt-tls-listening-port={free_port()}", f"--min-port={relay_base}",
             f"--max-port={relay_base + 99}", "--use-auth-secret", f"--static-auth-secret={secret}",
             "--realm=braid.test", f"--cert={cert}", f"--pkey={key}", "--allow-loopback-peers", "--no-cli",
             "--no-dtls", "--fingerprint", f"--pidfile={tmp_dir / f'turnserver-{port}.pid'}",
             f"--userdb={tmp_dir / f'turndb-{port}'}", "--log-file=stdout", "--simple-log", "--verbose"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    turn = TurnProcess(port, tls_port, secret, cert, proc, log_path)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"turnserver exited with {proc.returncode}:\n{turn.log()}")
        try:
            with socket.create_connection(("127.0.0.1", tls_port), timeout=0.2):
                return turn
        except OSError:
            time.sleep(0.05)
    turn.stop()
    raise RuntimeError(f"turnserver did not start:\n{turn.log()}")
