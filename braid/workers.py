"""Every core of a media pod: `media.workers` processes, each its own media node.

One media node forwards on one core (one Python event loop). A media process asked for several workers becomes a
small supervisor that starts that many `braid-server` processes, each a complete media node: its own node id
(`<id>-w<i>`), HTTP and gRPC ports (`port + i*step`, `grpc_port + i*step`, see `port_step`; a free gRPC port when
grpc_port is 0) and an equal slice of the UDP port range, all on the same IP. Each registers with the router on its own, so placement spreads participants
over them and a room whose participants land on different workers spans them through the relay, as it spans
machines. The supervisor forwards SIGTERM/SIGINT (each worker drains its own participants) and, if one worker
fails, stops the others and exits with its status, so the pod restarts as a whole.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from braid.shared.config import ENV_PREFIX, Config

log = logging.getLogger("braid.workers")


def available_cpus() -> int:
    """CPUs this process may use: the cgroup v2 quota when one is set (a Kubernetes CPU limit), else affinity."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))  # a limit of 1.5 CPUs: 2 workers
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def worker_count(config: Config) -> int:
    return config.media.workers or available_cpus()


def port_step(port: int, grpc_port: int, count: int) -> int:
    """The spacing of the workers' ports, so that `port + i*step` and `grpc_port + j*step` never meet (with the
    usual 7880/7881, workers use 7880, 7882, ... and 7881, 7883, ...)."""
    gap = abs(grpc_port - port)
    if not grpc_port or gap >= count:
        return 1
    step = 2
    while gap % step == 0:
        step += 1
    return step


def worker_configs(config: Config, count: int) -> list[Config]:
    """The configuration of each worker: the same, but for identity, ports (its own rtc.udp_port / tcp_port:
    the base + i) and its slice of the UDP range."""
    base_id = config.node_id or f"media-{os.uname().nodename}-{os.getpid()}"
    start, end = config.rtc.port_range_start, config.rtc.port_range_end
    size = (end - start + 1) // count
    if size < 1:
        raise ValueError(f"rtc.port_range_start/end: {end - start + 1} ports cannot be split over {count} workers")
    step = port_step(config.port, config.grpc_port, count)
    configs = []
    for i in range(count):
        worker = dataclasses.replace(
            config,
            node_id=f"{base_id}-w{i}",
            port=config.port + i * step,
            grpc_port=config.grpc_port + i * step if config.grpc_port else 0,
            rtc=dataclasses.replace(config.rtc, port_range_start=start + i * size,
                                    port_range_end=end if i == count - 1 else start + (i + 1) * size - 1,
                                    udp_port=config.rtc.udp_port + i if config.rtc.udp_port else 0,
                                    tcp_port=config.rtc.tcp_port + i if config.rtc.tcp_port else 0),
            media=dataclasses.replace(config.media, workers=1),
        )
        configs.append(worker)
    return configs


def _die_with_parent() -> None:
    """In the worker, before exec: if the supervisor is killed outright, the kernel stops the worker too."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_workers(config: Config, count: int) -> int:
    """Start `count` media workers and supervise them; the exit status of the pod."""
    children: list[subprocess.Popen] = []
    # Each worker gets its whole configuration on stdin: nothing from the environment may override its identity
    # or ports, so BRAID_* variables (already part of `config`) are not passed on.
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    stopping = False

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for worker in worker_configs(config, count):
        child = subprocess.Popen([sys.executable, "-m", "braid.server", "--config", "/dev/stdin"], stdin=subprocess.PIPE,
                                 env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        assert child.stdin is not None
        child.stdin.write(yaml.safe_dump(dataclasses.asdict(worker)).encode())
        child.stdin.close()
        children.append(child)
        log.info("media worker %s started (pid %d): HTTP %d, UDP %d-%d", worker.node_id, child.pid, worker.port,
                 worker.rtc.port_range_start, worker.rtc.port_range_end)
    status = 0
    while children:
        for child in list(children):
            code = child.poll()
            if code is None:
                continue
            children.remove(child)
            if code and not stopping:
                log.error("media worker pid %d exited with %d: stopping the others", child.pid, code)
                status = code
                stop(signal.SIGTERM, None)
            elif not stopping:
                log.info("media worker pid %d finished (drained)", child.pid)
        time.sleep(0.2)
    return status
