"""The official Node SDKs against `braid-server --dev`, as a Node app uses them: @livekit/rtc-node participants
calling each other and a Python SDK participant over RPC, and livekit-server-sdk's RoomService and
AgentDispatchService (tests/node/sdk_check.mjs; scripts/ensure-node-sdks.sh installs the pinned SDKs)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from livekit import rtc

from braid.clients.harness import Observer, join_token

pytestmark = pytest.mark.timeout(120)

NODE_DIR = Path(__file__).resolve().parent / "node"
ROOT = NODE_DIR.parents[1]


@pytest.fixture(scope="module")
def node_sdks() -> Path:
    subprocess.run(["bash", str(ROOT / "scripts" / "ensure-node-sdks.sh")], check=True)
    return NODE_DIR / "sdk_check.mjs"


async def _line(proc: asyncio.subprocess.Process, prefix: str, output: list[str], timeout: float = 60) -> str:
    async def read() -> str:
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                raise AssertionError(f"the Node app exited before {prefix!r}:\n" + "".join(output[-40:]))
            line = raw.decode(errors="replace")
            output.append(line)
            if line.startswith(prefix):
                return line[len(prefix):].strip()
    return await asyncio.wait_for(read(), timeout)


async def test_node_sdks_rpc_data_and_server_apis(dev_server, room_name, node_sdks):
    py = Observer("py")
    calls: list[tuple[str, str]] = []

    async def py_echo(data: rtc.RpcInvocationData) -> str:
        calls.append((data.caller_identity, data.payload))
        return f"python heard {data.payload}"

    await py.connect(dev_server.ws_url, join_token(dev_server.api_key, dev_server.api_secret, room_name, "py"))
    py.room.local_participant.register_rpc_method("py-echo", py_echo)
    proc = await asyncio.create_subprocess_exec(
        "node", str(node_sdks), dev_server.ws_url, dev_server.http_url, dev_server.api_key, dev_server.api_secret,
        room_name, cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output: list[str] = []
    try:
        result = json.loads(await _line(proc, "RESULT ", output))
        assert "error" not in result, result["error"]
        assert result["roomName"] == room_name
        assert result["nodeToNode"] == {"caller": "node-b", "payload": "from b"}
        assert result["nodeToPython"] == "python heard from node" and calls == [("node-b", "from node")]
        assert result["unsupportedMethod"] == 1400  # RpcError.ErrorCode.UNSUPPORTED_METHOD
        assert result["nobodyThere"] in (1401, 1501), result  # recipient disconnected / not found
        assert result["listed"] == ["node-a", "node-b", "py"]
        assert result["metadataSeen"] is True
        assert result["dataSeen"] == {"text": "hello a", "from": "", "topic": "greeting"}  # sent by the server
        assert result["dispatchListed"] == [["node-agent", "from node"]] and result["dispatchAfterDelete"] == 0

        await _line(proc, "READY", output)
        answer = json.loads(await py.room.local_participant.perform_rpc(
            destination_identity="node-a", method="node-echo", payload="from python"))
        assert answer == {"caller": "py", "payload": "from python"}
        await py.room.local_participant.publish_data(b"bye", reliable=True, topic="done")
        assert await asyncio.wait_for(proc.wait(), 30) == 0, "".join(output[-40:])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await py.close()
