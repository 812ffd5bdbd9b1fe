"""Durable webhooks for a cluster: a per-room outbox in Redis streams that any live node delivers.

Appending: `notify()` buffers the event and one writer task appends it, in order, with one Lua script that drops an
id already taken (`SET NX` on the id, kept for `retention`: see `webhooks.stable_event_id`), numbers it in its room
(`INCR`), adds it to the room's stream (`XADD`, at most `max_events` kept) and lists the room as pending; the same
script keeps a participant's events coherent whichever nodes report them (`webhooks.coherence`: once its
participant_joined is in, an aborted end goes out as participant_left; after its end, no joined). `flush()`
waits until everything notified so far is in Redis: callers await it before acknowledging the change that caused
the events (a record removed, a room closed), so a node killed after that loses nothing.

Delivering: every node looks at the pending rooms each `SCAN_INTERVAL` (at once after appending) and takes the lease
`hooks:<room>` of any room nobody delivers. The holder sends each URL the room's events in stream order from that
URL's cursor (in Redis, advanced after each 2xx); a holder killed mid-send leaves the next one to send the same
event again, with the same id: at least once, in order per room. A failed POST (connection error, timeout, 5xx,
429) is retried with capped exponential backoff for as long as the event is retained, so a receiver down for many
minutes receives everything when it is back; another 4xx is final for that event. Events older than `retention`,
or pushed out by `max_events`, are dropped: the gap in the room's numbers tells the next delivery how many a URL
missed (`num_dropped` of the event it gets next), and the delivering node logs and counts them (`/metrics`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, NamedTuple, Sequence

import aiohttp
from livekit.protocol.webhook import WebhookEvent

from braid.shared.webhooks import (
    SessionFactory, UrlStats, WebhookDeliveryError, coherence, encode_event, is_retryable, post_event,
    prepare_event,
)

log = logging.getLogger(__name__)

Lease = Callable[[str, str, float], Awaitable[bool]]

SCAN_INTERVAL = 1.0
LEASE_TTL = 6.0
BATCH = 32
MAX_BUFFERED = 10_000  # events notified but not yet in Redis (Redis away): oldest dropped beyond this
MAX_ROOMS = 256  # rooms one node delivers at once

# KEYS: stream, seq, seen, index, the related event's seen (webhooks.coherence). ARGV: id, body, seen ttl ms, room,
# max events, what a related event already taken does ('': nothing, 'drop', 'swap': send the alternative body), the
# alternative body.
_APPEND = """
if not redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[3]) then return 0 end
local body = ARGV[2]
if ARGV[6] ~= '' and redis.call('EXISTS', KEYS[5]) == 1 then
  if ARGV[6] == 'drop' then return 0 end
  body = ARGV[7]
end
local seq = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[5], '*', 'id', ARGV[1], 'seq', seq, 'body', body)
redis.call('SADD', KEYS[4], ARGV[4])
return 1
"""

# All delivered: forget the room's outbox unless an event arrived since. KEYS: stream, seq, cursors, index.
# ARGV: room, id of the last delivered entry ('' when the stream was empty).
_CLEANUP = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last_id = ''
if #last > 0 then last_id = last[1][1] end
if last_id ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
return 1
"""


class _Pending(NamedTuple):
    """An event notified but not yet in Redis."""

    room: str
    id: str
    body: bytes
    name: str
    related: str = ""  # webhooks.coherence: the related event's id, what it does, and the alternative body
    mode: str = ""
    alternative: bytes = b""


@dataclass
class _Cursor:
    entry_id: str = "0-0"
    seq: int = 0

    @classmethod
    def parse(cls, raw: bytes | None) -> _Cursor:
        if not raw:
            return cls()
        entry_id, _, seq = raw.decode().partition(" ")
        return cls(entry_id, int(seq or 0))

    def encode(self) -> str:
        return f"{self.entry_id} {self.seq}"


def _entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def _with_dropped(body: bytes, dropped: int) -> bytes:
    data = json.loads(body)
    data["numDropped"] = int(data.get("numDropped", 0)) + dropped
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class RedisOutbox:
    """The cluster's `Notifier`: events are durable in Redis before `flush()` returns, delivered by any live node."""

    def __init__(
        self,
        client,
        prefix: str,
        urls: Sequence[str],
        api_key: str,
        api_secret: str,
        lease: Lease,
        owner: str,
        *,
        timeout: float = 5.0,
        retention: float = 24 * 3600.0,
        max_events: int = 10_000,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        session_factory: SessionFactory | None = None,
    ):
        if not api_key or not api_secret:
            raise ValueError("webhooks need an API key and secret to sign with")
        if retention <= 0 or max_events < 1:
            raise ValueError("webhook retention and max_events must be positive")
        self.r = client
        self.prefix = prefix
        self.urls = list(dict.fromkeys(urls))
        self._api_key, self._api_secret = api_key, api_secret
        self._lease, self.owner = lease, owner
        self.timeout = timeout
        self.retention = retention
        self.max_events = max_events
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._stats = {url: UrlStats(url) for url in self.urls}
        self._buffer: collections.deque[_Pending] = collections.deque()
        self._buffered = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._wake = asyncio.Event()
        self.buffer_dropped = 0
        self._rooms: dict[str, asyncio.Task] = {}  # rooms this node is delivering
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    # --- keys ---------------------------------------------------------------------------------------------------

    def _key(self, room: str, part: str) -> str:
        return f"{self.prefix}:{{room:{room}}}:hooks{part}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}:hooks:rooms"

    # --- Notifier -------------------------------------------------------------------------------------------------

    def notify(self, event: WebhookEvent) -> None:
        """Buffer `event` for the outbox (never blocks); fills `id` and `created_at` when empty."""
        prepare_event(event)
        if self._closing:
            log.warning("webhook outbox is stopped: event %s (%s) not stored", event.id, event.event)
            return
        if len(self._buffer) >= MAX_BUFFERED:
            lost = self._buffer.popleft()
            self.buffer_dropped += 1
            log.warning("webhook outbox buffer full (Redis away?): dropped %s (%s), %d so far", lost.id, lost.name,
                        self.buffer_dropped)
        pending = _Pending(event.room.name, event.id, encode_event(event), event.event)
        rule = coherence(event)
        if rule is not None:
            alternative = encode_event(rule.as_left) if rule.as_left is not None else b""
            pending = pending._replace(related=rule.related, mode="drop" if rule.drop else "swap",
                                       alternative=alternative)
        self._buffer.append(pending)
        self._empty.clear()
        self._buffered.set()

    async def flush(self, timeout: float = 5.0) -> bool:
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            log.warning("webhook outbox: %d event(s) not yet stored after %.1fs", len(self._buffer), timeout)
            return False

    async def start(self) -> None:
        if self._tasks:
            return
        self._session = self._session_factory() if self._session_factory else aiohttp.ClientSession()
        self._wake.set()  # look for undelivered events at once
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="webhook-outbox-writer"),
            asyncio.create_task(self._scan_loop(), name="webhook-outbox-scan"),
            asyncio.create_task(self._keep_leases(), name="webhook-outbox-leases"),
        ]
        log.info("webhooks: durable outbox in Redis, sending to %s", ", ".join(self.urls))

    async def stop(self, timeout: float = 5.0) -> None:
        """Store what is buffered (within `timeout`), then stop delivering: other nodes take over what is left."""
        if self._closing:
            return
        await self.flush(timeout)
        self._closing = True
        tasks = [*self._tasks, *self._rooms.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks, self._rooms = [], {}
        if self._buffer:
            log.warning("webhook outbox: %d event(s) could not be stored before stop", len(self._buffer))
        if self._session is not None:
            await self._session.close()
            self._session = None

    def stats(self) -> list[UrlStats]:
        for stats in self._stats.values():
            stats.queued = len(self._buffer)
        return list(self._stats.values())

    @property
    def num_dropped(self) -> int:
        return self.buffer_dropped + sum(s.dropped for s in self._stats.values())

    # --- appending ------------------------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        failing = False
        while True:
            if not self._buffer:
                self._empty.set()
                self._buffered.clear()
                await self._buffered.wait()
                continue
            pending = self._buffer[0]
            room, event_id = pending.room, pending.id
            seen = self._key(room, f":seen:{event_id}")
            related = self._key(room, f":seen:{pending.related}") if pending.related else seen
            try:
                await self.r.eval(_APPEND, 5, self._key(room, ""), self._key(room, ":seq"), seen, self._index,
                                  related, event_id, pending.body, int(self.retention * 1000), room, self.max_events,
                                  pending.mode, pending.alternative)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("webhook outbox: cannot store events (%r); retrying", exc)
                failing = True
                await asyncio.sleep(0.5)
                continue
            if failing:
                log.info("webhook outbox: storing events again")
                failing = False
            if self._buffer and self._buffer[0].id == event_id:
                self._buffer.popleft()
            self._wake.set()

    # --- delivering -----------------------------------------------------------------------------------------------

    async def _scan_loop(self) -> None:
        failing = False
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), SCAN_INTERVAL)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                rooms = sorted(r.decode() for r in await self.r.smembers(self._index))
                for room in rooms:
                    if room in self._rooms or len(self._rooms) >= MAX_ROOMS:
                        continue
                    if await self._lease(f"hooks:{room}", self.owner, LEASE_TTL):
                        task = asyncio.create_task(self._deliver_room(room), name=f"webhook-room {room}")
                        self._rooms[room] = task
                        task.add_done_callback(lambda _t, room=room: self._rooms.pop(room, None))
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("webhook outbox: scan failed (%r); retrying", exc)
                failing = True

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE_TTL / 3)
            for room, task in list(self._rooms.items()):
                try:
                    held = await self._lease(f"hooks:{room}", self.owner, LEASE_TTL)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    held = False  # cannot renew: stop before another node takes over
                if not held:
                    log.info("webhook outbox: lost the lease of room %s; another node delivers it", room)
                    task.cancel()

    async def _deliver_room(self, room: str) -> None:
        stream = self._key(room, "")
        try:
            while True:
                await self._expire(room)
                caught_up: dict[str, bool] = {}
                await asyncio.gather(*(self._follow(room, url, caught_up) for url in self.urls))
                last = await self.r.xrevrange(stream, "+", "-", count=1)
                last_id = last[0][0].decode() if last else ""
                cursors = await self.r.hgetall(self._key(room, ":cursors"))
                if last_id and any(_Cursor.parse(cursors.get(u.encode())).entry_id != last_id for u in self.urls):
                    continue
                if await self.r.eval(_CLEANUP, 4, stream, self._key(room, ":seq"), self._key(room, ":cursors"),
                                     self._index, room, last_id):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("webhook outbox: delivering room %s failed (%r); retrying", room, exc)
            await asyncio.sleep(SCAN_INTERVAL)

    async def _follow(self, room: str, url: str, caught_up: dict[str, bool]) -> None:
        """Keep `url` current until every URL has caught up (a dead receiver delays no other)."""
        while True:
            caught_up[url] = False
            await self._deliver_url(room, url)
            caught_up[url] = True
            if len(caught_up) == len(self.urls) and all(caught_up.values()):
                return
            await asyncio.sleep(0.2)

    async def _expire(self, room: str) -> None:
        """Drop events past retention (their URLs learn the count from the gap in numbers)."""
        cutoff = int((time.time() - self.retention) * 1000)
        await self.r.xtrim(self._key(room, ""), minid=f"{cutoff}-0", approximate=False)

    async def _deliver_url(self, room: str, url: str) -> None:
        """Send `url` everything after its cursor; returns when it has caught up."""
        stream, cursors = self._key(room, ""), self._key(room, ":cursors")
        cursor = _Cursor.parse(await self.r.hget(cursors, url))
        stats = self._stats[url]
        while True:
            entries = await self.r.xrange(stream, f"({cursor.entry_id}", "+", count=BATCH)
            if not entries:
                return
            for raw_id, fields in entries:
                entry_id = raw_id.decode()
                seq = int(fields[b"seq"])
                body = fields[b"body"]
                missed = seq - cursor.seq - 1
                if missed > 0:
                    stats.dropped += missed
                    log.warning("webhooks: %d event(s) of room %s were dropped before reaching %s (retention)",
                                missed, room, url)
                    body = _with_dropped(body, missed)
                await self._send(room, url, fields[b"id"].decode(), entry_id, body)
                cursor = _Cursor(entry_id, seq)
                await self.r.hset(cursors, url, cursor.encode())

    async def _send(self, room: str, url: str, event_id: str, entry_id: str, body: bytes) -> None:
        """POST until it is taken, refused for good (4xx) or too old to keep."""
        stats = self._stats[url]
        attempt = 0
        assert self._session is not None
        while True:
            try:
                await post_event(self._session, url, body, self._api_key, self._api_secret, self.timeout)
                stats.sent += 1
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_retryable(exc):
                    stats.failed += 1
                    log.warning("webhooks: %s refused event %s of room %s: %s", url, event_id, room, exc)
                    return
                attempt += 1
                if time.time() * 1000 - _entry_ms(entry_id) > self.retention * 1000:
                    stats.dropped += 1
                    log.warning("webhooks: event %s of room %s for %s is past retention after %d attempts; "
                                "dropped", event_id, room, url, attempt)
                    return
                delay = min(self.backoff_initial * 2 ** min(attempt - 1, 16), self.backoff_max)
                if isinstance(exc, WebhookDeliveryError) and exc.retry_after is not None:
                    delay = min(exc.retry_after, self.backoff_max)
                if attempt == 1 or attempt % 10 == 0:
                    log.info("webhooks: event %s of room %s to %s failed (attempt %d): %s; retrying in %.1fs",
                             event_id, room, url, attempt, str(exc) or type(exc).__name__, delay)
                await asyncio.sleep(delay + random.uniform(0, self.backoff_initial))
