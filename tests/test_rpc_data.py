"""What the SDKs check of the server, participant RPC, RoomService PerformRpc, data sender identity and frame
metadata: official Python SDK clients and livekit-api against `braid-server --dev`."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import pytest
from livekit import api, rtc

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import pattern_frame

pytestmark = pytest.mark.timeout(120)


async def _join(server, room: str, identity: str, collect_media: bool = True, **grants) -> Observer:
    obs = Observer(identity, collect_media=collect_media)
    await obs.connect(server.ws_url, join_token(server.api_key, server.api_secret, room, identity, **grants))
    return obs


async def _perform_rpc(lk: api.LiveKitAPI, req: api.PerformRpcRequest) -> api.PerformRpcResponse:
    """RoomService.PerformRpc through livekit-api's Twirp client (its Python RoomService has no wrapper yet)."""
    service = lk.room
    return await service._client.request("RoomService", "PerformRpc", req, service._auth_header(
        api.VideoGrants(room_admin=True, room=req.room)), api.PerformRpcResponse)


def _echo(data: rtc.RpcInvocationData) -> str:
    if data.payload == "fail":
        raise rtc.RpcError(4001, "refused", "details")
    return f"{data.caller_identity}:{data.method}:{data.payload}"


async def test_rpc_between_clients_and_perform_rpc(dev_server, room_name):
    alice = await _join(dev_server, room_name, "alice")
    bob = await _join(dev_server, room_name, "bob")
    lk = api.LiveKitAPI(dev_server.http_url, dev_server.api_key, dev_server.api_secret)
    try:
        alice.room.local_participant.register_rpc_method("echo", _echo)

        async def slow(data: rtc.RpcInvocationData) -> str:
            await asyncio.sleep(3)
            return "late"

        alice.room.local_participant.register_rpc_method("slow", slow)
        assert await wait_until(lambda: "alice" in {p.identity for p in bob.room.remote_participants.values()}, 10)

        answer = await bob.room.local_participant.perform_rpc(
            destination_identity="alice", method="echo", payload="hi")
        assert answer == "bob:echo:hi"
        with pytest.raises(rtc.RpcError) as failed:
            await bob.room.local_participant.perform_rpc(destination_identity="alice", method="echo", payload="fail")
        assert (failed.value.code, failed.value.message, failed.value.data) == (4001, "refused", "details")
        with pytest.raises(rtc.RpcError) as unknown:
            await bob.room.local_participant.perform_rpc(destination_identity="alice", method="nope", payload="")
        assert unknown.value.code == 1400

        # RoomService PerformRpc: the server is the caller.
        reply = await _perform_rpc(lk, api.PerformRpcRequest(
            room=room_name, destination_identity="alice", method="echo", payload="from-server"))
        assert reply.payload.endswith(":echo:from-server")
        with pytest.raises(api.TwirpError) as app_error:
            await _perform_rpc(lk, api.PerformRpcRequest(
                room=room_name, destination_identity="alice", method="echo", payload="fail"))
        assert app_error.value.code == "internal" and "4001" in app_error.value.message
        with pytest.raises(api.TwirpError) as timed_out:
            await _perform_rpc(lk, api.PerformRpcRequest(
                room=room_name, destination_identity="alice", method="slow", payload="", response_timeout_ms=1000))
        assert timed_out.value.code == "canceled" and "1502" in timed_out.value.message
        reply = await _perform_rpc(lk, api.PerformRpcRequest(
            room=room_name, destination_identity="alice", method="slow", payload="", response_timeout_ms=6000))
        assert reply.payload == "late"
        with pytest.raises(api.TwirpError) as missing:
            await _perform_rpc(lk, api.PerformRpcRequest(
                room=room_name, destination_identity="nobody", method="echo", payload=""))
        assert missing.value.code == "not_found"
    finally:
        await lk.aclose()
        await alice.close()
        await bob.close()


async def test_sender_identity_hidden_and_transcription(dev_server, room_name):
    watcher = await _join(dev_server, room_name, "watcher")
    ghost = await _join(dev_server, room_name, "ghost", hidden=True)
    agent = await _join(dev_server, room_name, "agent-1", agent=True)
    user = await _join(dev_server, room_name, "user")
    transcripts: list[rtc.Transcription] = []
    watcher.room.on("transcription_received", lambda segments, participant, pub: transcripts.append(
        (participant.identity if participant else None, [s.text for s in segments])))
    try:
        assert await wait_until(lambda: {"agent-1", "user"} <= {
            p.identity for p in watcher.room.remote_participants.values()}, 10)
        assert "ghost" not in {p.identity for p in watcher.room.remote_participants.values()}
        await ghost.room.local_participant.publish_data(b"from-ghost", reliable=True, topic="g")
        await user.room.local_participant.publish_data(b"from-user", reliable=True, topic="u")
        assert await wait_until(lambda: {d.topic for d in watcher.data} >= {"g", "u"}, 10)
        by_topic = {d.topic: d for d in watcher.data}
        assert by_topic["g"].participant is None  # hidden senders are anonymous
        assert by_topic["u"].participant.identity == "user"

        # An agent transcribes the user: the segment names the user, whoever published it.
        for sender, text in ((user, "forged"), (agent, "hello")):
            await sender.room.local_participant.publish_transcription(rtc.Transcription(
                participant_identity="user", track_sid="TR_transcribed", segments=[rtc.TranscriptionSegment(
                    id=f"seg-{text}", text=text, start_time=0, end_time=0, language="en", final=True)]))
        assert await wait_until(lambda: any(t[1] == ["hello"] for t in transcripts), 10), transcripts
        await asyncio.sleep(0.5)
        assert transcripts == [("user", ["hello"])]  # a non-agent's transcription is not forwarded
    finally:
        for obs in (watcher, ghost, agent, user):
            await obs.close()


async def _publish_with_metadata(obs: Observer) -> tuple[rtc.VideoSource, rtc.LocalTrackPublication]:
    source = rtc.VideoSource(320, 240)
    track = rtc.LocalVideoTrack.create_video_track("camera", source)
    options = rtc.TrackPublishOptions(
        source=rtc.TrackSource.SOURCE_CAMERA,
        frame_metadata_features=[rtc.FrameMetadataFeature.FMF_USER_TIMESTAMP, rtc.FrameMetadataFeature.FMF_FRAME_ID])
    pub = await obs.room.local_participant.publish_track(track, options)
    return source, pub


async def _send_frames(source: rtc.VideoSource, stop: asyncio.Event) -> None:
    index = 0
    while not stop.is_set():
        index += 1
        source.capture_frame(pattern_frame(320, 240, index), timestamp_us=int(time.monotonic() * 1e6),
                             metadata=rtc.FrameMetadata(user_timestamp=1_000_000 + index, frame_id=index))
        await asyncio.sleep(1 / 30)


async def test_frame_metadata_features_round_trip_also_after_rejoin(dev_server, room_name):
    """The publisher's packet trailer features reach the subscriber's TrackInfo (which makes its SDK read the
    frame metadata trailer) and the room's stored participant, again after a fresh connection."""
    viewer = await _join(dev_server, room_name, "viewer")
    lk = api.LiveKitAPI(dev_server.http_url, dev_server.api_key, dev_server.api_secret)
    for attempt in range(2):  # the second time through a brand-new connection and publication
        sender = await _join(dev_server, room_name, "camera")
        stop = asyncio.Event()
        source, pub = await _publish_with_metadata(sender)
        pumping = asyncio.create_task(_send_frames(source, stop))
        try:
            assert await wait_until(lambda: any(
                p.identity == "camera" and any(list(t.frame_metadata_features) for t in p.track_publications.values())
                for p in viewer.room.remote_participants.values()), 10), "TrackInfo lost the frame metadata features"
            features = {list(t.frame_metadata_features)[0] for p in viewer.room.remote_participants.values()
                        for t in p.track_publications.values() if list(t.frame_metadata_features)}
            assert features, f"attempt {attempt}"
            stored = await lk.room.list_participants(api.ListParticipantsRequest(room=room_name))
            camera = next(p for p in stored.participants if p.identity == "camera")
            assert [list(t.packet_trailer_features) for t in camera.tracks] == [[0, 1]], camera.tracks
        finally:
            stop.set()
            await pumping
            await sender.close()
        await wait_until(lambda: "camera" not in {p.identity for p in viewer.room.remote_participants.values()}, 10)
    await lk.aclose()
    await viewer.close()


def _collect_metadata(viewer: Observer, into: list[tuple[int, int]]) -> tuple[list[asyncio.Task], Callable]:
    """Reads every video track `viewer` subscribes to from now on and keeps the (user_timestamp, frame_id) of each
    frame that carried frame metadata; returns the readers and the handler to turn off."""
    tasks: list[asyncio.Task] = []

    async def read(track: rtc.Track) -> None:
        stream = rtc.VideoStream(track)
        try:
            async for event in stream:
                if event.metadata is not None and event.metadata.HasField("frame_id"):
                    into.append((event.metadata.user_timestamp, event.metadata.frame_id))
        finally:
            await stream.aclose()

    def subscribed(track: rtc.Track, pub: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant) -> None:
        if track.kind == rtc.TrackKind.KIND_VIDEO:
            tasks.append(asyncio.create_task(read(track)))

    viewer.room.on("track_subscribed", subscribed)
    return tasks, subscribed


async def test_frame_metadata_reaches_the_subscriber_also_after_a_full_reconnect(dev_server, room_name):
    """The subscriber's decoded frames carry the publisher's user timestamp and frame id (the SDK's packet trailer),
    for a first publication and again after the publisher disconnected and joined through a new connection. The
    viewer keeps no stream of its own on the track: the SDK gives a frame's metadata to one stream only."""
    viewer = await _join(dev_server, room_name, "viewer", collect_media=False)
    for attempt in range(2):
        seen: list[tuple[int, int]] = []
        readers, handler = _collect_metadata(viewer, seen)
        sender = await _join(dev_server, room_name, "camera")
        stop = asyncio.Event()
        source, _ = await _publish_with_metadata(sender)
        pumping = asyncio.create_task(_send_frames(source, stop))
        try:
            assert await wait_until(lambda: len(seen) >= 20, 20), f"attempt {attempt}: metadata of {seen[:5]}"
            ids = [frame_id for _, frame_id in seen]
            assert ids == sorted(ids) and len(set(ids)) == len(ids), f"attempt {attempt}: frame ids {ids}"
            assert all(stamp == 1_000_000 + frame_id for stamp, frame_id in seen), f"attempt {attempt}: {seen}"
        finally:
            stop.set()
            await pumping
            await sender.close()
            viewer.room.off("track_subscribed", handler)
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        await wait_until(lambda: "camera" not in {p.identity for p in viewer.room.remote_participants.values()}, 10)
    await viewer.close()


async def test_publishing_a_data_track_is_refused_at_once(dev_server, room_name):
    """Data tracks are not implemented: the SDK gets LiveKit's refusal at once rather than waiting out a timeout."""
    publisher = await _join(dev_server, room_name, "publisher")
    try:
        started = time.monotonic()
        with pytest.raises(Exception, match="(?i)unauthorized|not allowed|not supported"):
            await publisher.room.local_participant.publish_data_track(name="telemetry")
        assert time.monotonic() - started < 3
    finally:
        await publisher.close()
