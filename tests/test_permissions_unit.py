"""The subscription permission rules (LiveKit's UpdateSubscriptionPermission semantics), without a server."""

from __future__ import annotations

import pytest
from livekit.protocol import rtc as rtc_pb

from braid.services.media.permissions import InvalidPermission, SubscriptionPermission


def _perm(**kwargs) -> rtc_pb.TrackPermission:
    return rtc_pb.TrackPermission(**kwargs)


def test_open_until_restricted_then_per_identity_and_per_track():
    access = SubscriptionPermission()
    assert access.allows("TR_a", "anyone")
    access.update(rtc_pb.SubscriptionPermission(all_participants=False), lambda sid: None)
    assert not access.allows("TR_a", "anyone")  # nobody listed: nobody allowed
    access.update(rtc_pb.SubscriptionPermission(track_permissions=[
        _perm(participant_identity="carol", all_tracks=True),
        _perm(participant_identity="bob", track_sids=["TR_a"]),
    ]), lambda sid: None)
    assert access.allows("TR_a", "carol") and access.allows("TR_b", "carol")
    assert access.allows("TR_a", "bob") and not access.allows("TR_b", "bob")
    assert not access.allows("TR_a", "dave")
    access.update(rtc_pb.SubscriptionPermission(all_participants=True, track_permissions=[
        _perm(participant_identity="bob")]), lambda sid: None)
    assert access.allows("TR_b", "dave")  # all_participants wins over the list


def test_sids_resolve_to_identities_and_unknown_ones_are_skipped():
    access = SubscriptionPermission()
    known = {"PA_bob": "bob"}
    access.update(rtc_pb.SubscriptionPermission(track_permissions=[
        _perm(participant_sid="PA_bob", all_tracks=True), _perm(participant_sid="PA_gone", all_tracks=True)]),
        known.get)
    assert access.allows("TR_a", "bob") and access.allowed is not None and set(access.allowed) == {"bob"}


def test_a_permission_naming_nobody_is_refused_and_keeps_the_rules():
    access = SubscriptionPermission()
    access.update(rtc_pb.SubscriptionPermission(track_permissions=[
        _perm(participant_identity="bob", all_tracks=True)]), lambda sid: None)
    with pytest.raises(InvalidPermission):
        access.update(rtc_pb.SubscriptionPermission(track_permissions=[_perm(all_tracks=True)]), lambda sid: None)
    assert access.allows("TR_a", "bob") and not access.allows("TR_a", "carol")


def test_resolved_rules_travel_to_another_node():
    origin, elsewhere = SubscriptionPermission(), SubscriptionPermission()
    origin.update(rtc_pb.SubscriptionPermission(track_permissions=[
        _perm(participant_sid="PA_bob", track_sids=["TR_v", "TR_a"])]), {"PA_bob": "bob"}.get)
    wire = rtc_pb.SubscriptionPermission.FromString(origin.to_proto().SerializeToString())
    assert elsewhere.apply_proto(wire)
    assert not elsewhere.apply_proto(wire)  # unchanged
    assert elsewhere.allows("TR_v", "bob") and not elsewhere.allows("TR_x", "bob") and not elsewhere.allows(
        "TR_v", "PA_bob")
    assert elsewhere.apply_proto(SubscriptionPermission().to_proto()) and elsewhere.allows("TR_x", "carol")


class _Subscriber:
    """Just enough of a participant for its `Subscriber`: what it is sent."""

    def __init__(self, identity: str):
        self.identity, self.sid, self.single_pc, self.closed = identity, f"PA_{identity}", True, False
        self.sent: list[rtc_pb.SignalResponse] = []
        self.last_answer_mids: set[str] = set()

    def send(self, response: rtc_pb.SignalResponse) -> None:
        self.sent.append(response)

    def may_subscribe_more(self) -> bool:
        return True

    def updates(self) -> list[tuple[str, bool]]:
        return [(r.subscription_permission_update.track_sid, r.subscription_permission_update.allowed)
                for r in self.sent if r.WhichOneof("message") == "subscription_permission_update"]


def _published(sid: str, access: SubscriptionPermission):
    from livekit.protocol import models

    from braid.services.media import sdp
    from braid.services.media.forward import UpTrack
    from braid.services.media.publisher import PublishedTrack

    up = UpTrack(sid, "audio", "audio/opus", 48000, 111, None, request_keyframe=lambda s: None,
                 request_nack=lambda s, q: None)
    return PublishedTrack(models.TrackInfo(sid=sid), "audio", "0", sdp.Codec(111, "opus", 48000, 2), None, up,
                          access=access)


async def test_subscribers_are_told_cut_off_and_reinstated():
    from braid.services.media.subscriber import Subscriber

    access = SubscriptionPermission()
    track = _published("TR_a", access)
    bob = _Subscriber("bob")
    subscriber = Subscriber(bob)
    subscriber.subscribe(track, "PA_alice")
    assert "TR_a" in subscriber.subs and bob.updates() == []

    access.update(rtc_pb.SubscriptionPermission(), lambda sid: None)
    subscriber.recheck_permission([track])
    assert "TR_a" not in subscriber.subs and bob.updates() == [("TR_a", False)]
    subscriber.subscribe(track, "PA_alice")  # asking again while denied: no repeated update
    assert bob.updates() == [("TR_a", False)]
    update = next(r.subscription_permission_update for r in bob.sent if r.HasField("subscription_permission_update"))
    assert update.participant_sid == "PA_alice"

    access.update(rtc_pb.SubscriptionPermission(track_permissions=[_perm(participant_identity="bob",
                                                                         track_sids=["TR_a"])]), lambda sid: None)
    subscriber.recheck_permission([track])
    assert "TR_a" in subscriber.subs and bob.updates() == [("TR_a", False), ("TR_a", True)]

    access.update(rtc_pb.SubscriptionPermission(), lambda sid: None)
    subscriber.recheck_permission([track])
    subscriber.unsubscribe("TR_a")  # no longer wanted: a later grant does not subscribe it
    access.update(rtc_pb.SubscriptionPermission(all_participants=True), lambda sid: None)
    subscriber.recheck_permission([track])
    assert "TR_a" not in subscriber.subs
    subscriber.close()
