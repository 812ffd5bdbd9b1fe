"""RoomService calls on live participants, observed by official SDK clients; grants (hidden, canSubscribe,
canPublishData, canUpdateOwnMetadata)."""

from __future__ import annotations

import pytest
from livekit import api
from livekit.protocol import models

from braid.clients.harness import Observer, join_token, wait_until
from braid.clients.media import DemoMedia

pytestmark = pytest.mark.timeout(120)


async def _join(server, room: str, identity: str, **grants) -> Observer:
    obs = Observer(identity)
    await obs.connect(server.ws_url, join_token(server.api_key, server.api_secret, room, identity, **grants))
    return obs


async def test_roomservice_on_live_participants(dev_server, room_name):
    lk = api.LiveKitAPI(dev_server.http_url, dev_server.api_key, dev_server.api_secret)
    a = await _join(dev_server, room_name, "a")
    b = await _join(dev_server, room_name, "b")
    media = DemoMedia(frequency=440)
    try:
        await media.start(a.room)
        audio_pub, video_pub = media.publications
        assert await wait_until(lambda: b.received.get("a") is not None and b.received["a"].frames > 5, 20)

        listed = await lk.room.list_participants(api.ListParticipantsRequest(room=room_name))
        by_id = {p.identity: p for p in listed.participants}
        assert set(by_id) == {"a", "b"}
        assert {t.sid for t in by_id["a"].tracks} == {audio_pub.sid, video_pub.sid}
        assert by_id["a"].state == models.ParticipantInfo.ACTIVE and by_id["a"].permission.can_publish
        got = await lk.room.get_participant(api.RoomParticipantIdentity(room=room_name, identity="a"))
        video_info = next(t for t in got.tracks if t.sid == video_pub.sid)
        assert video_info.mime_type == "video/VP8" and video_info.width == 320

        muted = await lk.room.mute_published_track(api.MuteRoomTrackRequest(
            room=room_name, identity="a", track_sid=audio_pub.sid, muted=True))
        assert muted.track.muted
        assert await wait_until(lambda: b.saw("track_muted", audio_pub.sid), 10)
        assert await wait_until(lambda: a.room.local_participant.track_publications[audio_pub.sid].muted, 10)

        await lk.room.update_participant(api.UpdateParticipantRequest(
            room=room_name, identity="a", metadata="meta-2", attributes={"k": "v"}))
        assert await wait_until(lambda: b.saw("metadata", "a=meta-2"), 10)
        assert await wait_until(lambda: a.room.local_participant.metadata == "meta-2", 10)
        assert await wait_until(lambda: b.room.remote_participants["a"].attributes.get("k") == "v", 5)

        await lk.room.update_room_metadata(api.UpdateRoomMetadataRequest(room=room_name, metadata="room-meta"))
        assert await wait_until(lambda: a.saw("room_metadata", "room-meta") and b.saw("room_metadata", "room-meta"), 10)

        await lk.room.send_data(api.SendDataRequest(room=room_name, data=b"to-b", kind=models.DataPacket.RELIABLE,
                                                    destination_identities=["b"], topic="srv"))
        await lk.room.send_data(api.SendDataRequest(room=room_name, data=b"to-all", kind=models.DataPacket.RELIABLE))
        assert await wait_until(lambda: {p.data for p in b.data} >= {b"to-b", b"to-all"}, 10)
        assert await wait_until(lambda: any(p.data == b"to-all" for p in a.data), 10)
        assert not any(p.data == b"to-b" for p in a.data)
        assert next(p for p in b.data if p.data == b"to-b").topic == "srv"

        await lk.room.update_subscriptions(api.UpdateSubscriptionsRequest(
            room=room_name, identity="b", track_sids=[video_pub.sid], subscribe=False))
        frames = b.received["a"].frames
        assert await wait_until(lambda: not b.room.remote_participants["a"].track_publications[
            video_pub.sid].subscribed or b.received["a"].frames == frames, 10)

        await lk.room.remove_participant(api.RoomParticipantIdentity(room=room_name, identity="b"))
        assert await wait_until(lambda: b.disconnect_reason is not None, 10)
        assert b.disconnect_reason == models.DisconnectReason.PARTICIPANT_REMOVED
        assert await wait_until(lambda: a.saw("participant_disconnected", "b"), 10)

        with pytest.raises(api.TwirpError) as info:
            await lk.room.remove_participant(api.RoomParticipantIdentity(room=room_name, identity="nobody"))
        assert info.value.code == "not_found"

        await lk.room.delete_room(api.DeleteRoomRequest(room=room_name))
        assert await wait_until(lambda: a.disconnect_reason is not None, 10)
        assert a.disconnect_reason == models.DisconnectReason.ROOM_DELETED
    finally:
        await media.stop()
        await a.close()
        await b.close()
        await lk.aclose()


async def test_grants(dev_server, room_name):
    a = await _join(dev_server, room_name, "a")
    hidden = await _join(dev_server, room_name, "ghost", hidden=True)
    watcher = await _join(dev_server, room_name, "no-sub", can_subscribe=False)
    mute = await _join(dev_server, room_name, "no-data", can_publish_data=False, can_update_own_metadata=True)
    media = DemoMedia(frequency=440, video=False)
    try:
        await media.start(a.room)
        assert await wait_until(lambda: hidden.received.get("a") is not None and
                                len(hidden.received["a"].samples) > 20, 15), "a hidden participant subscribes"
        assert "ghost" not in a.room.remote_participants and "ghost" not in watcher.room.remote_participants
        assert "a" in watcher.room.remote_participants
        assert not watcher.received, "canSubscribe=false receives no media"

        await mute.room.local_participant.publish_data(b"dropped", reliable=True)
        await a.room.local_participant.publish_data(b"delivered", reliable=True)
        assert await wait_until(lambda: any(p.data == b"delivered" for p in mute.data), 10)
        assert not any(p.data == b"dropped" for p in a.data)

        await mute.room.local_participant.set_metadata("mine")
        assert await wait_until(lambda: a.saw("metadata", "no-data=mine"), 10)
        try:  # refused with request_response NOT_ALLOWED (the SDK may or may not raise)
            await a.room.local_participant.set_metadata("not allowed")
        except Exception:
            pass
        assert not await wait_until(lambda: mute.saw("metadata", "a=not allowed"), 1.5)
    finally:
        await media.stop()
        for obs in (a, hidden, watcher, mute):
            await obs.close()



