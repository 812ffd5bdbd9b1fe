"""Dynacast: which simulcast layers a publisher is told to keep, and when."""

from livekit.protocol import models

from braid.services.media.dynacast import DOWNGRADE_DELAY, Dynacast
from braid.services.media.downtrack import DownTrack
from braid.services.media.forward import LayerRelay, UpTrack


def up_track(*caps, paused=(), remote=()):
    """A simulcast up-track with local subscribers capped at `caps` and relays wanting `remote`."""
    up = UpTrack("TR_a", "video", "video/VP8", 90000, 96, None, lambda ssrc: None, lambda ssrc, seqs: None)
    up.expected_rids = ["q", "h", "f"]
    for i, cap in enumerate(caps):
        down = DownTrack(up, lambda packet: None, 96)
        down.requested_quality, down.paused = cap, i in paused
        up.downs.append(down)
    for wants in remote:
        up.relays.append(LayerRelay(up, wants))
    return up


def enabled(update):
    return {q.quality: q.enabled for q in update.subscribed_qualities}


def test_layers_nobody_watches_are_turned_off_after_the_delay():
    dyn = Dynacast("TR_a", "vp8")
    up = up_track(0, 0)
    assert dyn.update(up, now=0.0) is None, "a downgrade waits"
    assert dyn.update(up, now=DOWNGRADE_DELAY - 0.1) is None
    update = dyn.update(up, now=DOWNGRADE_DELAY + 0.1)
    assert enabled(update) == {models.VideoQuality.LOW: True, models.VideoQuality.MEDIUM: False,
                               models.VideoQuality.HIGH: False}
    assert update.subscribed_codecs[0].codec == "vp8" and update.track_sid == "TR_a"
    assert dyn.update(up, now=10.0) is None, "nothing new to say"


def test_a_subscriber_wanting_more_turns_layers_on_at_once():
    dyn = Dynacast("TR_a", "vp8")
    low = up_track(0)
    dyn.update(low, 0.0)
    dyn.update(low, DOWNGRADE_DELAY + 1)
    update = dyn.update(up_track(0, 2), DOWNGRADE_DELAY + 1.5)
    assert update is not None and all(enabled(update).values())


def test_paused_subscribers_and_no_subscribers_want_nothing():
    dyn = Dynacast("TR_a", "vp8")
    up = up_track(2, paused=(0,))
    dyn.update(up, 0.0)
    update = dyn.update(up, DOWNGRADE_DELAY + 1)
    assert not any(enabled(update).values())


def test_a_brief_dip_does_not_reach_the_publisher():
    dyn = Dynacast("TR_a", "vp8")
    assert dyn.update(up_track(1), 0.0) is None
    assert dyn.update(up_track(2), 1.0) is None, "back to everything before the delay ran out"
    assert dyn.update(up_track(2), DOWNGRADE_DELAY + 2) is None


def test_single_layer_tracks_are_left_alone():
    dyn = Dynacast("TR_a", "vp8")
    up = up_track(0)
    up.expected_rids = []
    assert dyn.update(up, 100.0) is None


def test_subscribers_on_other_nodes_count_like_local_ones():
    """The origin's dynacast merges what its own subscribers want with what each relay's node wants."""
    dyn = Dynacast("TR_a", "vp8")
    only_remote = up_track(remote=[(2,)])
    dyn.update(only_remote, 0.0)
    assert dyn.update(only_remote, DOWNGRADE_DELAY + 1) is None, "a remote viewer of the top layer keeps all on"
    mixed = up_track(0, remote=[(1,), ()])
    dyn.update(mixed, 10.0)
    update = dyn.update(mixed, 10.0 + DOWNGRADE_DELAY + 1)
    assert enabled(update) == {models.VideoQuality.LOW: True, models.VideoQuality.MEDIUM: True,
                               models.VideoQuality.HIGH: False}
    nobody = up_track(1, paused=(0,), remote=[()])
    dyn.update(nobody, 20.0)
    update = dyn.update(nobody, 20.0 + DOWNGRADE_DELAY + 1)
    assert not any(enabled(update).values()), "a node whose subscribers all disabled the track wants nothing"
