"""The edge's choice of router (services/signal/failover.py), with the registry and the routers' answers faked:
the fault (a router that stops answering) is the point, and the cluster tests cover it with real processes."""

from __future__ import annotations

import grpc

from braid.shared.store import NodeInfo
from services.signal.failover import Routers


class _Registry:
    def __init__(self) -> None:
        self.routers: list[NodeInfo] = []

    async def nodes(self, role: str) -> list[NodeInfo]:
        return list(self.routers) if role == "router" else []


class _Channels:
    def router(self, address: str) -> str:
        return address


def _unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details="connection refused")


async def test_when_every_known_router_fails_the_registry_is_asked_again_before_giving_up():
    """An edge that looked at the registry before a second router registered still fails over to it at once."""
    registry = _Registry()
    routers = Routers(registry, _Channels(), seed="dead:1")
    tried: list[str] = []

    async def send(address: str) -> str:
        tried.append(address)
        if address == "dead:1":
            raise _unavailable()
        return f"answered by {address}"

    registry.routers = [NodeInfo(node_id="r2", role="router", address="live:2")]  # registered after the last look
    assert await routers.call(send) == "answered by live:2"
    assert tried == ["dead:1", "live:2"]
    tried.clear()
    assert await routers.call(send) == "answered by live:2" and tried == ["live:2"]  # it sticks to the live one


async def test_no_router_answers_raises_unavailable():
    routers = Routers(_Registry(), _Channels(), seed="dead:1")

    async def send(address: str) -> str:
        raise _unavailable()

    try:
        await routers.call(send)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
    else:
        raise AssertionError("a call no router answered returned")
