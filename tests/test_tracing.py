"""OpenTelemetry: a join is one trace across signal → router → media (context carried in gRPC metadata)."""

from __future__ import annotations

import json
import re

from braid.clients.harness import Observer, join_token, wait_until


def _spans(log: str) -> list[dict]:
    """The console exporter prints each span as a JSON object."""
    spans, depth, start = [], 0, None
    for i, ch in enumerate(log):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0 and start is not None:
                chunk = log[start:i + 1]
                if '"trace_id"' in chunk:
                    try:
                        spans.append(json.loads(chunk))
                    except json.JSONDecodeError:
                        pass
    return spans


async def test_join_is_one_trace_across_the_services(server_factory, room_name):
    server = server_factory(env={"BRAID_TELEMETRY__OTEL_EXPORTER": "console"})
    client = Observer("traced")
    try:
        await client.connect(server.ws_url, join_token(server.api_key, server.api_secret, room_name, "traced"))
    finally:
        await client.close()
    wanted = {"signal.join", "router.place", "media.session.start"}
    assert await wait_until(lambda: wanted <= {s["name"] for s in _spans(server.log())}, 15), server.log()[-3000:]
    spans = {s["name"]: s for s in _spans(server.log()) if s["name"] in wanted}
    trace_ids = {s["context"]["trace_id"] for s in spans.values()}
    assert len(trace_ids) == 1, trace_ids
    root = spans["signal.join"]["context"]["span_id"]
    assert spans["router.place"]["parent_id"] == root and spans["media.session.start"]["parent_id"] == root
    assert spans["signal.join"]["attributes"]["braid.room"] == room_name
    assert re.match(r"ND_", spans["media.session.start"]["attributes"]["braid.media_node"])
