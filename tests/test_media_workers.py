"""A media pod on every core: `media.workers` processes, each its own media node, one room spanning them."""

from __future__ import annotations

import dataclasses

import pytest

from braid.shared.config import Config, ConfigError, load_config
from braid.workers import worker_configs

from .cluster import start_cluster, stop_cluster, wait_for
from .test_cluster_media import _describe, _join, _media_flowing


def test_workers_split_ports_and_identity():
    config = load_config(env={}, overrides={"keys": {"k": "s"}, "role": "media", "port": 7000, "grpc_port": 9000,
                                    "redis": {"address": "127.0.0.1:1"},
                                    "node_id": "ND_pod", "rtc": {"port_range_start": 50000, "port_range_end": 50999},
                                    "media": {"workers": 3}})
    workers = worker_configs(config, 3)
    assert [w.node_id for w in workers] == ["ND_pod-w0", "ND_pod-w1", "ND_pod-w2"]
    assert [w.port for w in workers] == [7000, 7001, 7002]
    assert [w.grpc_port for w in workers] == [9000, 9001, 9002]
    assert [(w.rtc.udp_port, w.rtc.tcp_port) for w in workers] == [(7882, 7881), (7883, 7882), (7884, 7883)]
    chart_like = worker_configs(dataclasses.replace(config, port=7880, grpc_port=7881), 3)
    assert [(w.port, w.grpc_port) for w in chart_like] == [(7880, 7881), (7882, 7883), (7884, 7885)]
    assert [(w.rtc.port_range_start, w.rtc.port_range_end) for w in workers] == [
        (50000, 50332), (50333, 50665), (50666, 50999)]
    assert all(w.media.workers == 1 and w.keys == {"k": "s"} for w in workers)
    assert dataclasses.replace(workers[0], node_id="ND_pod", port=7000, grpc_port=9000, rtc=config.rtc,
                               media=config.media) == config  # nothing else differs
    with pytest.raises(ValueError):
        worker_configs(dataclasses.replace(config, rtc=dataclasses.replace(config.rtc, port_range_end=50001)), 3)
    with pytest.raises(ConfigError):
        load_config(env={}, overrides={"keys": {"k": "s"}, "media": {"workers": -1}})
    assert Config().media.workers == 1


@pytest.fixture
def two_worker_pod(tmp_path, redis_server):
    c = start_cluster(tmp_path, redis_server, signal_regions=("eu-west",), media_regions=("eu-west",),
                      media_env={"BRAID_MEDIA__WORKERS": "2", "BRAID_LIMITS__MAX_PARTICIPANTS": "1"})
    yield c
    stop_cluster(c)


async def test_one_room_spans_the_workers_of_one_media_pod(two_worker_pod, room_name):
    """One media process with two workers registers two media nodes; with one participant per node allowed,
    alice and bob land on different workers and hear and see each other through the relay."""
    pod = two_worker_pod
    assert await wait_for(lambda: set(pod.registry()) == {"ND_media1-w0", "ND_media1-w1"}, 15), pod.registry()
    eu = pod.signal("eu-west")
    a = await _join(eu, room_name, "alice")
    from braid.clients.media import DemoMedia

    media_a, media_b = DemoMedia(frequency=440), DemoMedia(frequency=660)
    b = None
    try:
        assert await wait_for(lambda: sum(n["participants"] for n in pod.registry().values()) == 1, 10)
        b = await _join(eu, room_name, "bob")
        assert await wait_for(lambda: sorted(n["participants"] for n in pod.registry().values()) == [1, 1], 10), (
            pod.registry())
        await media_a.start(a.room)
        await media_b.start(b.room)
        assert await _media_flowing(a, 440, b, 660, 30), (_describe(a, "bob"), _describe(b, "alice"))
    finally:
        await media_a.stop()
        await media_b.stop()
        for obs in (a, b):
            if obs is not None:
                await obs.close()
