"""Node selection: state and hard limits first, then the strategy; every choice says why."""

import pytest

from braid.services.router.placement import NodeSelector, Region
from braid.shared.store import NodeInfo


def node(node_id, participants=0, region="", state="SERVING", cpu=0.0, **limits):
    return NodeInfo(node_id=node_id, role="media", address=f"{node_id}:1", region=region, state=state,
                    participants=participants, cpu_load=cpu, **limits)


def test_draining_and_full_nodes_are_never_chosen():
    selector = NodeSelector("least_load")
    nodes = [node("a", state="DRAINING"), node("b", participants=5, max_participants=5), node("c", participants=9)]
    choice = selector.choose(nodes)
    assert choice.node.node_id == "c"
    only_bad = selector.choose(nodes[:2])
    assert only_bad.node is None and "hard limit" in only_bad.reason
    assert selector.choose([node("x", state="DRAINING")]).node is None


@pytest.mark.parametrize("limit", [{"max_tracks": 3, "tracks": 3}, {"max_bytes_per_second": 10.0, "bytes_per_second": 11.0}])
def test_track_and_bandwidth_limits(limit):
    full = NodeInfo(node_id="full", role="media", address="f:1", **limit)
    choice = NodeSelector().choose([full, node("free", participants=50)])
    assert choice.node.node_id == "free"


def test_least_load_prefers_room_host_then_lowest_load():
    selector = NodeSelector("least_load")
    nodes = [node("a", participants=3), node("b", participants=1)]
    assert selector.choose(nodes).node.node_id == "b"
    assert selector.choose(nodes, hosting={"a"}).node.node_id == "a"
    assert "already hosts" in selector.choose(nodes, hosting={"a"}).reason


def test_resume_stays_on_its_node():
    choice = NodeSelector().choose([node("a"), node("b", participants=9)], prefer="b")
    assert choice.node.node_id == "b" and "resume" in choice.reason


def test_region_aware_uses_same_then_nearest_region():
    regions = [Region("eu", 50.1, 8.7), Region("us-east", 39.0, -77.5), Region("us-west", 37.4, -122.1)]
    selector = NodeSelector("region_aware", regions)
    nodes = [node("eu1", region="eu", participants=9), node("use1", region="us-east"), node("usw1", region="us-west")]
    assert selector.choose(nodes, region="eu").node.node_id == "eu1"
    nodes_no_eu = nodes[1:]
    choice = selector.choose(nodes_no_eu, region="eu")
    assert choice.node.node_id == "use1" and "nearest region us-east" in choice.reason


def test_power_of_two_picks_the_less_loaded_of_two():
    picks = iter(["a", "c"])
    nodes = [node("a", participants=7), node("b", participants=0), node("c", participants=2)]

    def pick(pool):
        wanted = next(picks)
        return next(n for n in pool if n.node_id == wanted)

    selector = NodeSelector("power_of_two", rng=pick)
    assert selector.choose(nodes).node.node_id == "c"


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError):
        NodeSelector("random-walk")
