"""A stock livekit-agents worker with a small entrypoint and no cloud plugins, run by the agent tests in the
separate .venv-agents (livekit-agents pins its own livekit rtc).

    python echo_worker.py <ws_url> <api_key> <api_secret> [agent_name] [room|publisher]

The agent joins the room, plays back to the room the first (non-agent) participant audio it hears (so a test proves it both
receives and publishes audio), and answers the RPC method `status` with what it has seen and which job it runs
(a publisher worker gets one job per participant that publishes).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from livekit import rtc
from livekit.agents import AgentServer, JobContext, JobExecutorType, WorkerOptions, WorkerType
from livekit.protocol import agent

SAMPLE_RATE = 48000


async def entrypoint(ctx: JobContext) -> None:
    heard = {"frames": 0, "from": ""}
    source = rtc.AudioSource(SAMPLE_RATE, 1)

    async def status(data: rtc.RpcInvocationData) -> str:
        return json.dumps({"pid": os.getpid(), "job_id": ctx.job.id, "caller": data.caller_identity,
                           "metadata": ctx.job.metadata, "frames": heard["frames"], "from": heard["from"],
                           "payload": data.payload, "job_type": agent.JobType.Name(ctx.job.type),
                           "participant": ctx.job.participant.identity})

    async def echo(track: rtc.Track, identity: str) -> None:
        stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1)
        async for event in stream:
            heard["frames"] += 1
            heard["from"] = identity
            await source.capture_frame(event.frame)

    tasks: list[asyncio.Task] = []

    def on_track(track: rtc.Track, pub: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant) -> None:
        if participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
            return  # another agent's echo (a room can have several agents): echo the people
        if track.kind == rtc.TrackKind.KIND_AUDIO and not tasks:
            tasks.append(asyncio.create_task(echo(track, participant.identity)))

    ctx.room.on("track_subscribed", on_track)
    await ctx.connect()
    ctx.room.local_participant.register_rpc_method("status", status)
    for participant in ctx.room.remote_participants.values():
        for pub in participant.track_publications.values():
            if pub.track is not None:
                on_track(pub.track, pub, participant)
    track = rtc.LocalAudioTrack.create_audio_track("echo", source)
    await ctx.room.local_participant.publish_track(
        track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
    print(f"JOB {ctx.job.id} pid={os.getpid()} room={ctx.room.name}", flush=True)


async def main() -> None:
    url, key, secret = sys.argv[1:4]
    agent_name = sys.argv[4] if len(sys.argv) > 4 else ""
    worker_type = WorkerType.PUBLISHER if sys.argv[5:6] == ["publisher"] else WorkerType.ROOM
    server = AgentServer.from_server_options(WorkerOptions(
        entrypoint_fnc=entrypoint, agent_name=agent_name, worker_type=worker_type, ws_url=url, api_key=key,
        api_secret=secret,
        job_executor_type=JobExecutorType.THREAD, num_idle_processes=0, port=0,
    ))
    server.on("worker_registered", lambda worker_id, info: print(
        f"REGISTERED {worker_id} pid={os.getpid()} server={info.version}", flush=True))
    await server.run(devmode=True)


if __name__ == "__main__":
    asyncio.run(main())
