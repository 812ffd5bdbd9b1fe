"""`make cluster`: Redis, a router, 2 signal and 3 media nodes in 2 regions, all on 127.0.0.1.

Each node is a separate `braid-server` process; Ctrl-C stops them all. Logs go to ./cluster-logs/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

KEY, SECRET = "devkey", "secret"
REGIONS = [
    {"name": "eu-west", "lat": 53.35, "lon": -6.26},
    {"name": "us-east", "lat": 38.9, "lon": -77.0},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}; see its log")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{name} not ready at {url} within {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--signal-ports", default="7880,7881")
    parser.add_argument("--logs", default="cluster-logs")
    args = parser.parse_args()
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server is not installed (scripts/ensure-test-deps.sh installs it)")

    logs = Path(args.logs)
    logs.mkdir(exist_ok=True)
    procs: list[tuple[str, subprocess.Popen]] = []

    def spawn(name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        procs.append((name, proc))
        return proc

    def stop_all(*_: object) -> None:
        for name, proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for name, proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise SystemExit(0)

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)

    redis_port = free_port()
    redis_dir = tempfile.mkdtemp(prefix="braid-redis-")
    spawn("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", redis_dir])
    redis = f"127.0.0.1:{redis_port}"
    common_env = {
        "BRAID_KEYS": f"{KEY}: {SECRET}",
        "BRAID_REDIS__ADDRESS": redis,
        "BRAID_ROUTER__NODE_SELECTOR": "region_aware",
    }
    server = [sys.executable, "-m", "braid.server"]
    regions_yaml = Path(tempfile.mkdtemp(prefix="braid-cluster-")) / "regions.yaml"
    regions_yaml.write_text(
        "router:\n  regions:\n"
        + "".join(f"    - {{name: {r['name']}, lat: {r['lat']}, lon: {r['lon']}}}\n" for r in REGIONS)
    )

    router_grpc, router_http = free_port(), free_port()
    router = spawn("router", [*server, "--config", str(regions_yaml), "--role", "router",
                              "--grpc-port", str(router_grpc), "--port", str(router_http)], common_env)
    wait_ready(f"http://127.0.0.1:{router_http}/readyz", router, "router")

    media_regions = ["eu-west", "eu-west", "us-east"]
    for i, region in enumerate(media_regions):
        http = free_port()
        start = 50000 + i * 1000
        proc = spawn(f"media-{i + 1}", [*server, "--role", "media", "--region", region, "--port", str(http)],
                     {**common_env, "BRAID_RTC__PORT_RANGE_START": str(start),
                      "BRAID_RTC__PORT_RANGE_END": str(start + 999), "BRAID_RTC__UDP_PORT": str(7882 + 2 * i),
                      "BRAID_RTC__TCP_PORT": str(7883 + 2 * i)})
        wait_ready(f"http://127.0.0.1:{http}/readyz", proc, f"media-{i + 1}")

    urls = []
    for i, port in enumerate(int(p) for p in args.signal_ports.split(",")):
        region = REGIONS[i % len(REGIONS)]["name"]
        proc = spawn(f"signal-{i + 1}", [*server, "--role", "signal", "--region", region, "--port", str(port),
                                         "--router-address", f"127.0.0.1:{router_grpc}"], common_env)
        wait_ready(f"http://127.0.0.1:{port}/readyz", proc, f"signal-{i + 1}")
        urls.append((f"ws://127.0.0.1:{port}", region))

    print(f"Braid cluster up: redis {redis}, router 127.0.0.1:{router_grpc}, 3 media nodes "
          f"({', '.join(media_regions)}), logs in {logs}/")
    for url, region in urls:
        print(f"  join via {url}  (signal node in {region})")
    print(f"  API key {KEY!r}, secret {SECRET!r}; Ctrl-C stops everything")
    sys.stdout.flush()
    while True:
        for name, proc in procs:
            if proc.poll() is not None:
                print(f"{name} exited with {proc.returncode}", file=sys.stderr)
        time.sleep(2)
        procs[:] = [(n, p) for n, p in procs if p.poll() is None]


if __name__ == "__main__":
    main()
