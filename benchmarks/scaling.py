"""`make bench`: does a media pod's capacity scale with its workers (issue 15, item 2)?

A real cluster (redis-server, a router, a signal node and one media pod of W worker processes, `media.workers`)
carries two rooms per worker, each one publisher (synthetic audio + video RTP, benchmarks/rawclient.py) and N
count-only subscribers; the router places each new room on the least loaded worker. Each worker then runs in a
cgroup of its own capped at `--cores` of CPU, and the publishers' packet rate rises step by step until the
subscribers stop receiving what was sent: the pod's capacity is the forwarded packets per second of the last step
before the first to lose more than `--max-loss` (past it, a worker's backlog would spill into later steps). Every worker carries the same rooms at the same rates as the one worker of W = 1
(a bigger burst per packet received costs less per packet forwarded, so loading fewer workers harder would flatter
the comparison).

Why a CPU cap: on a 2-core machine the load generator needs CPU as well, so two uncapped workers could never be
saturated honestly; capped, each worker has a known share, and the question "does a second share of CPU give a
second worker's worth of forwarding" is answered with CPU to spare for the clients. The caps are applied once
everyone has joined (joins under a small cap would take minutes) and lifted before the next run.

    python -m benchmarks.scaling [--workers 1,2] [--cores 0.2] [--subscribers 40]
                                 [--start 2] [--growth 1.07] [--duration 6]

Needs root (cgroup CPU limits, v1 or v2) and redis-server; without them it says so and measures nothing.
BENCH_LOG_LEVEL=INFO keeps the servers' logs (test-artifacts/bench-scaling-*.log) at INFO.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .procs import ROOT, Proc, free_port, run

KEY, SECRET = "benchkey", "a-benchmark-secret-that-is-long-enough"
ROOMS_PER_WORKER = 2
PERIOD_US = 10_000  # short CFS periods: a capped worker pauses for at most a few ms, not for 90 ms of 100


class CgroupUnavailable(RuntimeError):
    pass


class CpuCap:
    """A cgroup whose processes together get at most `cores` of CPU (cgroup v2 `cpu.max` or v1 CFS quota)."""

    def __init__(self, name: str) -> None:
        unified = Path("/sys/fs/cgroup/cgroup.controllers")
        if unified.exists() and "cpu" in unified.read_text().split():
            self.v2, self.path = True, Path("/sys/fs/cgroup") / name
            subtree = Path("/sys/fs/cgroup/cgroup.subtree_control")
            if "cpu" not in subtree.read_text().split():
                self._write(subtree, "+cpu")
        elif Path("/sys/fs/cgroup/cpu/cgroup.procs").exists():
            self.v2, self.path = False, Path("/sys/fs/cgroup/cpu") / name
        else:
            raise CgroupUnavailable("no cgroup CPU controller")
        try:
            self.path.mkdir(exist_ok=True)
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create {self.path}: {exc}") from exc
        self.lift()

    @staticmethod
    def _write(path: Path, value: str) -> None:
        try:
            path.write_text(value)
        except OSError as exc:
            raise CgroupUnavailable(f"cannot write {path}: {exc}") from exc

    def add(self, pid: int) -> None:
        self._write(self.path / "cgroup.procs", str(pid))

    def cap(self, cores: float) -> None:
        quota = max(1000, int(cores * PERIOD_US))
        if self.v2:
            self._write(self.path / "cpu.max", f"{quota} {PERIOD_US}")
        else:
            self._write(self.path / "cpu.cfs_period_us", str(PERIOD_US))
            self._write(self.path / "cpu.cfs_quota_us", str(quota))

    def lift(self) -> None:
        if self.v2:
            self._write(self.path / "cpu.max", f"max {PERIOD_US}")
        else:
            self._write(self.path / "cpu.cfs_quota_us", "-1")

    def throttled_us(self) -> int:
        for line in (self.path / "cpu.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "throttled_usec":
                return int(value)
            if name == "throttled_time":
                return int(value) // 1000
        return 0

    def remove(self) -> None:
        try:
            self.path.rmdir()  # once its processes have exited
        except OSError:
            pass


@dataclass
class Pod:
    procs: list[Proc]
    signal_url: str
    media: Proc
    redis_port: int
    workers: list[int] = field(default_factory=list)  # worker pids

    def registry(self) -> dict[str, dict]:
        import redis

        r = redis.Redis(host="127.0.0.1", port=self.redis_port, socket_timeout=2)
        try:
            nodes = (json.loads(r.get(k) or "{}") for k in r.keys("braid:node:*"))
            return {n["node_id"]: n for n in nodes if n.get("role") == "media"}
        finally:
            r.close()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_pod(workers: int, log_dir: Path) -> Pod:
    redis_port = free_port()
    redis_dir = tempfile.mkdtemp(prefix="braid-bench-redis-")
    procs = [Proc(f"scaling-redis-{workers}", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                               "--save", "", "--appendonly", "no", "--dir", redis_dir], {}, log_dir)]
    env = {"BRAID_KEYS": f"{KEY}: {SECRET}", "BRAID_REDIS__ADDRESS": f"127.0.0.1:{redis_port}",
           "BRAID_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING")}
    time.sleep(0.3)
    server = [sys.executable, "-m", "braid.server"]
    router_grpc = free_port()

    def spawn(name: str, args: list[str], extra: dict[str, str] | None = None) -> Proc:
        port = free_port()
        proc = Proc(f"scaling-{name}-{workers}", [*server, *args, "--port", str(port)], {**env, **(extra or {})},
                    log_dir, port)
        procs.append(proc)
        return proc

    spawn("router", ["--role", "router", "--grpc-port", str(router_grpc)])
    udp = free_port(socket.SOCK_DGRAM)
    media = spawn("media", ["--role", "media", "--region", "eu-west", "--grpc-port", str(free_port())],
                  {"BRAID_MEDIA__WORKERS": str(workers), "BRAID_RTC__PORT_RANGE_START": "54000",
                   "BRAID_RTC__PORT_RANGE_END": "54999", "BRAID_RTC__UDP_PORT": str(udp),
                   "BRAID_RTC__TCP_PORT": str(free_port())})
    signal = spawn("signal", ["--role", "signal", "--region", "eu-west", "--router-address", f"127.0.0.1:{router_grpc}"])
    pod = Pod(procs, f"ws://127.0.0.1:{signal.http_port}", media, redis_port)
    try:
        for proc in procs[1:]:
            proc.wait_ready()
        deadline = time.monotonic() + 20
        while len(pod.registry()) < workers and time.monotonic() < deadline:
            time.sleep(0.2)
        pod.workers = _children(media.proc.pid) if workers > 1 else [media.proc.pid]
        if len(pod.workers) != workers or len(pod.registry()) != workers:
            raise RuntimeError(f"media pod: {len(pod.workers)} worker processes, registry {sorted(pod.registry())}")
    except BaseException:
        pod.stop()
        raise
    return pod


async def measure(workers: int, args: argparse.Namespace, log_dir: Path) -> list[dict]:
    from aiortc.rtcdtlstransport import RTCCertificate

    from braid.clients.harness import join_token
    from braid.services.media.ice import PortRange

    from .rawclient import RawParticipant, join_subscribers, start_publisher

    pod = start_pod(workers, log_dir)
    caps: list[CpuCap] = []
    clients: list[RawParticipant] = []
    senders = []
    rows: list[dict] = []
    try:
        caps = [CpuCap(f"braid-bench-w{i}") for i in range(workers)]
        for cap, pid in zip(caps, pod.workers):
            cap.add(pid)
        ports = PortRange(45000, 49999, host="127.0.0.1")
        cert = RTCCertificate.generateCertificate()
        rooms = []
        for r in range(ROOMS_PER_WORKER * workers):
            room = f"scaling-{workers}-{r}"
            before = sum(n["participants"] for n in pod.registry().values())
            sender = await start_publisher(pod.signal_url, join_token(KEY, SECRET, room, "publisher"), ports, cert,
                                           30.0, args.start, clients)
            senders.append(sender)
            deadline = time.monotonic() + 10  # the next room is placed by load: let the registry see this one
            while sum(n["participants"] for n in pod.registry().values()) <= before and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            subs = await join_subscribers(pod.signal_url, room, args.subscribers,
                                          lambda rm, i: join_token(KEY, SECRET, rm, i), ports, cert, clients,
                                          count_only=True)
            rooms.append((sender, subs))
        for cap in caps:
            cap.cap(args.cores)
        for ppf in _ramp(args.start, args.growth):
            for sender in senders:
                sender.packets_per_frame = ppf
            await asyncio.sleep(args.settle)
            sent0 = [s.sent for s, _ in rooms]
            got0 = [sum(sub.counters.packets for sub in subs) for _, subs in rooms]
            cpu0 = [_cpu_seconds(pid) for pid in pod.workers]
            supervisor0 = _cpu_seconds(pod.media.proc.pid) if workers > 1 else 0.0
            throttled0 = [cap.throttled_us() for cap in caps]
            own0, t0 = time.process_time(), time.monotonic()
            await asyncio.sleep(args.duration)
            elapsed = time.monotonic() - t0
            per_room = [((s.sent - s0) * len(subs), sum(sub.counters.packets for sub in subs) - g0)
                        for (s, subs), s0, g0 in zip(rooms, sent0, got0)]
            expected, got = sum(e for e, _ in per_room), sum(g for _, g in per_room)
            row = {
                "workers": workers, "ppf": ppf, "in_pps": sum(s.sent - s0 for (s, _), s0 in zip(rooms, sent0)) / elapsed,
                "fwd_pps": got / elapsed, "delivered": got / expected if expected else 0.0,
                "worker_cpu": [(_cpu_seconds(pid) - c0) / elapsed for pid, c0 in zip(pod.workers, cpu0)],
                "throttled": [(cap.throttled_us() - t) / 1e6 / elapsed for cap, t in zip(caps, throttled0)],
                "bench_cpu": (time.process_time() - own0) / elapsed,
                "supervisor_cpu": (_cpu_seconds(pod.media.proc.pid) - supervisor0) / elapsed if workers > 1 else None,
                "rooms_delivered": [g / e if e else 0.0 for e, g in per_room],
                "placement": {n: info["participants"] for n, info in sorted(pod.registry().items())},
            }
            rows.append(row)
            _print_row(row)
            if row["delivered"] < 1 - args.max_loss:
                break  # saturated
    finally:
        for sender in senders:
            await sender.stop()
        for cap in caps:
            cap.lift()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        pod.stop()
        for cap in caps:
            cap.remove()
    return rows


def _ramp(start: int, growth: float, last: int = 200):
    """Video packets per frame, each step about `growth` times the one before."""
    k = float(start)
    while round(k) <= last:
        yield round(k)
        k = max(k * growth, round(k) + 1)


def _print_row(r: dict) -> None:
    cpu = " ".join(f"{100 * c:4.0f}%" for c in r["worker_cpu"])
    throttled = " ".join(f"{100 * t:3.0f}%" for t in r["throttled"])
    print(f"  W={r['workers']} {r['ppf']:>3} pkts/frame: in {r['in_pps']:6.0f} pps, forwarded {r['fwd_pps']:7.0f} pps, "
          f"delivered {100 * r['delivered']:5.1f}%, worker CPU {cpu} (throttled {throttled}), "
          + (f"supervisor {100 * r['supervisor_cpu']:.0f}% (uncapped), " if r["supervisor_cpu"] is not None else "")
          + f"load generator {100 * r['bench_cpu']:.0f}%, by room "
          + " ".join(f"{100 * d:.0f}%" for d in r["rooms_delivered"]), flush=True)


def capacity(rows: list[dict], max_loss: float) -> float:
    passed = [r["fwd_pps"] for r in rows if r["delivered"] >= 1 - max_loss]
    return passed[-1] if passed else 0.0


async def main_async(args: argparse.Namespace) -> None:
    if not shutil.which("redis-server"):
        print("scaling: skipped, redis-server is not installed (scripts/ensure-test-deps.sh installs it)")
        return
    try:
        CpuCap("braid-bench-probe").remove()
    except CgroupUnavailable as exc:
        print(f"scaling: skipped, CPU caps need root and a cgroup CPU controller ({exc})")
        return
    log_dir = ROOT / "test-artifacts"
    log_dir.mkdir(exist_ok=True)
    print(f"Worker scaling: one media pod, {ROOMS_PER_WORKER} rooms per worker of 1 publisher (Opus 50 pps + video "
          f"30 fps x k packets) and {args.subscribers} subscribers each, every worker capped at {args.cores:g} cores, "
          f"{os.cpu_count()} CPUs")
    results = {}
    for workers in args.workers:
        rows = await measure(workers, args, log_dir)
        results[workers] = capacity(rows, args.max_loss)
        print(f"  W={workers}: participants per worker {rows[0]['placement'] if rows else '?'}; capacity "
              f"{results[workers]:.0f} forwarded pps with at most {100 * args.max_loss:g}% lost", flush=True)
    if 1 in results and results[1]:
        for workers, value in sorted(results.items()):
            if workers > 1:
                print(f"  {workers} workers on {workers} x {args.cores:g} cores: {value / results[1]:.2f}x the "
                      f"capacity of 1 worker on {args.cores:g} (target for 2: at least 1.8x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--cores", type=float, default=0.2, help="CPU cap of each worker, in cores")
    parser.add_argument("--subscribers", type=int, default=40, help="subscribers per room")
    parser.add_argument("--start", type=int, default=2, help="video packets per frame at the first step")
    parser.add_argument("--growth", type=float, default=1.07, help="packet rate of a step over the one before")
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--max-loss", type=float, default=0.01)
    args = parser.parse_args(argv)
    args.workers = [int(v) for v in args.workers.split(",")]
    run(main_async(args))


if __name__ == "__main__":
    main()
