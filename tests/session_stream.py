"""A `Media.Session` request stream driven by the test: the media node reads SessionUp messages from it."""

from __future__ import annotations

import asyncio

from livekit.protocol import models
from livekit.protocol import rtc as rtc_pb

from braid.rpc import media_pb2


class Stream:
    """An async iterator of SessionUp messages the test feeds (None ends it)."""

    def __init__(self, *first: media_pb2.SessionUp):
        self.queue: asyncio.Queue = asyncio.Queue()
        for message in first:
            self.queue.put_nowait(message)

    def push(self, message) -> None:
        self.queue.put_nowait(message)

    def request(self, **fields) -> None:
        self.push(media_pb2.SessionUp(request=rtc_pb.SignalRequest(**fields).SerializeToString()))

    def end(self) -> None:
        self.push(media_pb2.SessionUp(end=media_pb2.SessionEnd(reason=models.DisconnectReason.SIGNAL_CLOSE)))

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        return item
