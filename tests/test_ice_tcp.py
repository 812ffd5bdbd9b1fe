"""ICE over TCP (issue 11): a client that cannot reach the media node over UDP connects over ICE-TCP.

The test makes a network namespace of its own (loopback plus a veth pair, so clients have a non-loopback interface
to gather from) whose firewall drops every UDP packet; braid-server and the clients run inside it: two Python SDK
participants that publish audio and video and must each receive the other's (tests/netns_call.py), and two
Chromium pages with livekit-client that must decode each other's camera (tests/netns_browser.py). With UDP gone,
only the node's passive TCP candidate on rtc.tcp_port can carry ICE, DTLS and SRTP (RFC 4571 framing).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid

import pytest

from .servers import ROOT, free_port, read_log, terminate

pytestmark = [pytest.mark.timeout(150)]


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@pytest.fixture
def udp_blocked_namespace():
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None:
        pytest.skip("needs root, ip and iptables (scripts/ensure-test-deps.sh installs iptables)")
    name = f"braid-noudp-{uuid.uuid4().hex[:8]}"
    _run("ip", "netns", "add", name)
    try:
        inside = ("ip", "netns", "exec", name)
        _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _run(*inside, "ip", "addr", "add", "198.51.100.2/24", "dev", "v0")  # TEST-NET-2, only inside the namespace
        _run(*inside, "ip", "link", "set", "v0", "up")
        _run(*inside, "ip", "link", "set", "v1", "up")
        _run(*inside, "iptables", "-A", "OUTPUT", "-p", "udp", "-j", "DROP")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


def _call_in_namespace(namespace: str, tmp_path, script: str, *script_args: str) -> tuple[dict, str]:
    """Start braid-server --dev inside `namespace`, run `python -m tests.<script> <port> *script_args` there too; returns
    the script's JSON line and the server's log."""
    inside = ["ip", "netns", "exec", namespace]
    port, udp_port, tcp_port = free_port(), free_port(socket.SOCK_DGRAM), free_port()
    log_path = tmp_path / "braid.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BRAID_RTC__UDP_PORT": str(udp_port),
           "BRAID_RTC__TCP_PORT": str(tcp_port)}
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen([*inside, sys.executable, "-m", "braid.server", "--dev", "--port", str(port)],
                                  stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        call = subprocess.run([*inside, sys.executable, "-m", f"tests.{script}", str(port), *script_args],
                              capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    finally:
        terminate(server, 10)
    log = read_log(log_path)
    assert call.returncode == 0, f"{call.stdout}\n{call.stderr[-3000:]}\n--- server\n{log[-3000:]}"
    return json.loads(call.stdout.strip().splitlines()[-1]), log


def test_sdk_clients_without_udp_exchange_audio_and_video_over_ice_tcp(udp_blocked_namespace, tmp_path):
    result, log = _call_in_namespace(udp_blocked_namespace, tmp_path, "netns_call", "no-udp")
    assert result["ok"], (result, log[-3000:])
    for name, tone in (("alice", 660.0), ("bob", 440.0)):  # what each heard is the other's tone
        assert result[name]["frames"] >= 20 and result[name]["pattern"], result
        assert abs(result[name]["tone"] - tone) < 15, result
    assert log.count("connected over TCP") == 2 and "connected over UDP" not in log, log[-3000:]


@pytest.mark.slow
def test_browsers_without_udp_join_over_ice_tcp(udp_blocked_namespace, tmp_path):
    """Chromium (livekit-client) in the namespace: both pages decode each other's camera, over TCP pairs."""
    result, log = _call_in_namespace(udp_blocked_namespace, tmp_path, "netns_browser", "no-udp-browser",
                                     str(tmp_path / "braid.log"))
    for name in ("alice", "bob"):
        assert result[name] and all(c.endswith("/tcp") for c in result[name]), result  # host or prflx, over TCP
    assert log.count("connected over TCP") == 2 and "connected over UDP" not in log, log[-3000:]
