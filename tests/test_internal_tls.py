"""Mutual TLS between the roles: a cluster whose router, signal and media nodes share a throwaway CA works end to
end (SDK clients on two media nodes hear each other over the relay, RoomService crosses router and media), and
its gRPC ports refuse whoever has no certificate from that CA: plaintext, TLS without a client certificate, or a
certificate from another CA."""

from __future__ import annotations

import grpc
import pytest
from livekit import api
from livekit.protocol import room as room_pb

from braid.clients.media import DemoMedia
from braid.rpc import common_pb2, router_pb2_grpc

from .cluster import KEY, SECRET, start_cluster, stop_cluster, throwaway_ca
from .test_cluster_media import _audio_ok, _describe, _join

pytestmark = pytest.mark.timeout(150)


async def _list_rooms(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    """'ok', or the status code the router's port answered with."""
    options = [("grpc.ssl_target_name_override", "braid.internal")]
    channel = (grpc.aio.secure_channel(address, credentials, options=options) if credentials
               else grpc.aio.insecure_channel(address))
    async with channel:
        call = common_pb2.RoomCall(method="ListRooms", request=room_pb.ListRoomsRequest().SerializeToString())
        try:
            await router_pb2_grpc.RouterStub(channel).Administer(call, timeout=3)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "ok"


async def test_cluster_over_mutual_tls(tmp_path, redis_server, room_name):
    tls = throwaway_ca(tmp_path)
    cluster = start_cluster(tmp_path, redis_server, env=tls, port_base=53000)
    alice = bob = None
    media_a, media_b = DemoMedia(frequency=440, video=False), DemoMedia(frequency=660, video=False)
    try:
        alice = await _join(cluster.signal("eu-west"), room_name, "alice")
        bob = await _join(cluster.signal("us-east"), room_name, "bob")
        assert sorted(cluster.media_hosting().values()) == [1, 1], "one participant on each media node"
        await media_a.start(alice.room)
        await media_b.start(bob.room)
        from braid.clients.harness import wait_until

        assert await wait_until(lambda: _audio_ok(alice, "bob", 660) and _audio_ok(bob, "alice", 440), 25), (
            _describe(alice, "bob"), _describe(bob, "alice"))
        lk = api.LiveKitAPI(cluster.signal("us-east").server.http_url, KEY, SECRET)
        try:
            listed = await lk.room.list_participants(api.ListParticipantsRequest(room=room_name))
            assert sorted(p.identity for p in listed.participants) == ["alice", "bob"]
        finally:
            await lk.aclose()

        router = f"127.0.0.1:{cluster.router.grpc_port}"
        with open(tls["BRAID_INTERNAL_TLS__CA_FILE"], "rb") as fh:
            ca = fh.read()
        stranger = throwaway_ca(tmp_path, name="stranger")
        read = lambda key: open(stranger[key], "rb").read()  # noqa: E731
        assert await _list_rooms(router, None) == "UNAVAILABLE", "plaintext is refused"
        assert await _list_rooms(router, grpc.ssl_channel_credentials(root_certificates=ca)) == "UNAVAILABLE", \
            "TLS without a client certificate is refused"
        foreign = grpc.ssl_channel_credentials(root_certificates=ca, private_key=read("BRAID_INTERNAL_TLS__KEY_FILE"),
                                               certificate_chain=read("BRAID_INTERNAL_TLS__CERT_FILE"))
        assert await _list_rooms(router, foreign) == "UNAVAILABLE", "a certificate from another CA is refused"
        member = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=open(tls["BRAID_INTERNAL_TLS__KEY_FILE"], "rb").read(),
            certificate_chain=open(tls["BRAID_INTERNAL_TLS__CERT_FILE"], "rb").read())
        assert await _list_rooms(router, member) == "ok", "a certificate of the cluster CA is served"
    finally:
        await media_a.stop()
        await media_b.stop()
        for obs in (alice, bob):
            if obs is not None:
                await obs.close()
        stop_cluster(cluster)
