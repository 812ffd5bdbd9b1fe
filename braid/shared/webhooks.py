"""Signed webhooks, sent the way LiveKit sends them, so `livekit.api.WebhookReceiver` verifies every one.

Wire format (LiveKit `webhook/url_notifier.go` behaviour, re-implemented):

* ``POST <url>`` with ``Content-Type: application/webhook+json`` and ``User-Agent: Braid``;
* body: the `WebhookEvent` as protojson (lowerCamelCase names, default values left out, int64 as
  strings, enums by name), compact;
* ``Authorization: <jwt>`` with *no* ``Bearer`` prefix: an HS256 token for the signing key, valid
  5 minutes, whose ``sha256`` claim is the base64 (standard alphabet) SHA-256 of the exact body bytes.

Delivery: each URL has its own bounded queue and its own sender task, so a slow or dead receiver
delays nobody but itself. Events to one URL go out one at a time, in order. A failed POST is retried
with exponential backoff (tenacity) on connection errors, timeouts, 5xx and 429; any other 4xx is
final. When a queue is full the oldest event is dropped, counted and logged, and the count is put in
``num_dropped`` of the next event that reaches that receiver.

`notify()` is synchronous and never blocks: call it from the event loop's thread. `start()` spawns
the sender tasks, `stop(timeout)` flushes what it can and then cancels them; the notifier owns every
task it creates.

Event ids: an event about one lifecycle step (a participant's join or end, a track's publication, a
room's start or end) gets an id derived from what it is about (`stable_event_id`), so whichever node
reports it, and however often, it is one event; a notifier drops an id it has already taken. This
notifier is the dev mode's in-memory outbox; a cluster uses the durable one in `braid.shared.outbox`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import aiohttp
from google.protobuf.json_format import MessageToDict
from livekit.protocol import models
from livekit.protocol.webhook import WebhookEvent
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from braid.shared.auth import body_sha256, mint_token
from braid.shared.config import Config
from braid.shared.ids import event_id, stable_id

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/webhook+json"
USER_AGENT = "Braid"
TOKEN_TTL_SECONDS = 5 * 60
DEFAULT_QUEUE_SIZE = 100  # per URL, as LiveKit's notifier
RECENT_IDS = 10_000  # ids remembered to drop a repeated event

# One event per lifecycle step: the key its id is derived from (a participant ends once, left or aborted).
_LIFECYCLE_KEYS = {
    "room_started": ("room_started", "room"),
    "room_finished": ("room_finished", "room"),
    "participant_joined": ("participant_joined", "participant"),
    "participant_left": ("participant_end", "participant"),
    "participant_connection_aborted": ("participant_end", "participant"),
    "track_published": ("track_published", "track"),
    "track_unpublished": ("track_unpublished", "track"),
}

SessionFactory = Callable[[], aiohttp.ClientSession]


class Notifier(Protocol):
    """What the server holds: a `WebhookNotifier` or, with no URLs configured, a `NullNotifier`."""

    def notify(self, event: WebhookEvent) -> None: ...

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every event notified so far is in the outbox (durable in a cluster); False on timeout."""
        ...

    async def start(self) -> None: ...

    async def stop(self, timeout: float = 5.0) -> None: ...

    def stats(self) -> list[UrlStats]: ...

    @property
    def num_dropped(self) -> int: ...


async def flush_events(notifier, timeout: float = 5.0) -> bool:
    """`notifier.flush()`, for any object with `notify` (a plain one is flushed as soon as it returns)."""
    flush = getattr(notifier, "flush", None)
    return True if flush is None else await flush(timeout)


def stable_event_id(event: WebhookEvent) -> str:
    """The id of a lifecycle event, the same on every node that reports it; a fresh one for anything else."""
    key = _LIFECYCLE_KEYS.get(event.event)
    if key is None:
        return event_id()
    step, subject = key
    sid = {"room": event.room.sid, "participant": event.participant.sid, "track": event.track.sid}[subject]
    if not sid:
        return event_id()
    return stable_id("EV_", step, event.room.name, event.room.sid, sid)


@dataclass(frozen=True)
class Coherence:
    """How one participant's lifecycle events stay coherent when several nodes report them (a peer ends a
    participant whose node went silent, knowing only what it last heard): LiveKit sends `participant_joined` when a
    participant becomes active, and then ends it with `participant_left`, never `participant_connection_aborted`;
    nor is it reported joined once it has ended. `related`: the id of the other event; when it was already taken,
    the event is dropped (`drop`) or sent as `participant_left` (`as_left`)."""

    related: str
    drop: bool
    as_left: WebhookEvent | None = None


def coherence(event: WebhookEvent) -> Coherence | None:
    """The rule for `event` (with its stable id filled), None for events it does not concern."""
    if event.event not in ("participant_joined", "participant_connection_aborted") or not event.participant.sid:
        return None
    joined = event.event == "participant_joined"
    related = stable_id("EV_", "participant_end" if joined else "participant_joined", event.room.name,
                        event.room.sid, event.participant.sid)
    if joined:
        return Coherence(related, drop=True)
    left = WebhookEvent()
    left.CopyFrom(event)
    left.event = "participant_left"
    return Coherence(related, drop=False, as_left=left)


def prepare_event(event: WebhookEvent) -> None:
    """Fill `id` and `created_at` when empty."""
    if not event.id:
        event.id = stable_event_id(event)
    if not event.created_at:
        event.created_at = int(time.time())


def participant_ended_events(room: models.Room, info: models.ParticipantInfo, reason: int) -> list[WebhookEvent]:
    """The last webhooks of a participant known only from its record (its node is gone): `track_unpublished`
    for each of its tracks, then `participant_left` if it was active, else `participant_connection_aborted`."""
    now = int(time.time())
    events = []
    for track in info.tracks:
        event = WebhookEvent(event="track_unpublished", created_at=now)
        event.room.CopyFrom(room)
        event.participant.CopyFrom(info)
        event.track.CopyFrom(track)
        events.append(event)
    ended = models.ParticipantInfo()
    ended.CopyFrom(info)
    active = info.state == models.ParticipantInfo.State.ACTIVE
    ended.state = models.ParticipantInfo.State.DISCONNECTED
    ended.disconnect_reason = reason
    event = WebhookEvent(event="participant_left" if active else "participant_connection_aborted", created_at=now)
    event.room.CopyFrom(room)
    event.participant.CopyFrom(ended)
    return [*events, event]


def encode_event(event: WebhookEvent) -> bytes:
    """The body LiveKit would send: protojson with lowerCamelCase names and defaults omitted, compact."""
    data = MessageToDict(event, preserving_proto_field_name=False)
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign_body(body: bytes, api_key: str, api_secret: str) -> str:
    """The `Authorization` header value (a bare JWT) for a webhook body."""
    return mint_token(
        api_key,
        api_secret,
        ttl_seconds=TOKEN_TTL_SECONDS,
        sha256=body_sha256(body),
        issued_at=True,
    )


class WebhookDeliveryError(Exception):
    """A receiver answered with a non-2xx status."""

    def __init__(self, url: str, status: int, retry_after: float | None = None):
        super().__init__(f"{url} answered HTTP {status}")
        self.url = url
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status >= 500 or self.status == 429


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, WebhookDeliveryError):
        return exc.retryable
    if isinstance(exc, aiohttp.InvalidURL):
        return False
    return isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError))


async def post_event(session: aiohttp.ClientSession, url: str, body: bytes, api_key: str, api_secret: str,
                     timeout: float) -> None:
    """One signed POST of an encoded event; raises `WebhookDeliveryError` on a non-2xx answer."""
    headers = {
        "Content-Type": CONTENT_TYPE,
        "Authorization": sign_body(body, api_key, api_secret),
        "User-Agent": USER_AGENT,
    }
    async with session.post(url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        if 200 <= resp.status < 300:
            return
        raise WebhookDeliveryError(url, resp.status, _retry_after(resp.headers.get("Retry-After")))


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date; fall back to our own backoff
    return seconds if seconds >= 0 else None


@dataclass
class _Item:
    event: WebhookEvent  # a private snapshot; never mutated after enqueueing
    body: bytes  # `event` serialised once, shared by every URL


@dataclass
class UrlStats:
    url: str
    queued: int = 0
    sent: int = 0
    failed: int = 0  # gave up after the last attempt, or a final 4xx
    dropped: int = 0  # pushed out of a full queue (or still queued at stop)


@dataclass
class _UrlSender:
    url: str
    queue_size: int
    queue: collections.deque[_Item] = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    stats: UrlStats = field(init=False)
    pending_dropped: int = 0  # drops not yet reported in `num_dropped`
    inflight: _Item | None = None  # being sent (or waiting to retry)
    task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.stats = UrlStats(self.url)

    def put(self, item: _Item) -> None:
        if len(self.queue) >= self.queue_size:
            self.queue.popleft()
            self.pending_dropped += 1
            self.stats.dropped += 1
            if self.pending_dropped == 1 or self.pending_dropped % 100 == 0:
                logger.warning(
                    "webhook queue for %s is full (%d): dropped the oldest event (%d dropped so far)",
                    self.url, self.queue_size, self.stats.dropped,
                )
        self.queue.append(item)
        self.stats.queued = len(self.queue)
        self.wake.set()


class WebhookNotifier:
    """Sends `WebhookEvent`s to several URLs, each with its own queue, sender task and retries."""

    def __init__(
        self,
        urls: Sequence[str],
        api_key: str,
        api_secret: str,
        timeout: float = 5.0,
        max_attempts: int = 5,
        session_factory: SessionFactory | None = None,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
    ):
        if not api_key or not api_secret:
            raise ValueError("webhooks need an API key and secret to sign with")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.urls = list(dict.fromkeys(urls))  # one sender per distinct URL
        self._api_key = api_key
        self._api_secret = api_secret
        self.timeout = timeout
        self.max_attempts = max_attempts
        self._backoff_max = backoff_max
        # backoff_initial, 2x, 4x … capped at backoff_max, plus up to backoff_initial of jitter
        self._backoff = wait_exponential(multiplier=backoff_initial, max=backoff_max) + wait_random(
            0, backoff_initial
        )
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._senders = [_UrlSender(url, queue_size) for url in self.urls]
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._started = False
        self._closing = False
        self._stopped = False

    # -- public API ----------------------------------------------------------------------------

    def notify(self, event: WebhookEvent) -> None:
        """Queue `event` for every URL; fills `id` and `created_at` when empty; an id seen before is dropped.
        Never blocks."""
        prepare_event(event)
        if event.id in self._recent:
            logger.debug("webhook %s (%s) already queued; not sent again", event.id, event.event)
            return
        self._recent[event.id] = None
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)
        rule = coherence(event)
        if rule is not None and rule.related in self._recent:
            if rule.drop:
                logger.info("webhook %s (%s): the participant has ended already; not sent", event.id, event.event)
                return
            event = rule.as_left
        if self._closing:
            logger.warning("webhook notifier is stopped: event %s (%s) not sent", event.id, event.event)
            return
        snapshot = WebhookEvent()
        snapshot.CopyFrom(event)
        item = _Item(snapshot, encode_event(snapshot))
        for sender in self._senders:
            sender.put(item)

    async def flush(self, timeout: float = 5.0) -> bool:
        return True  # queued in memory at notify(): nothing more to wait for

    async def start(self) -> None:
        """Start one sender task per URL (idempotent)."""
        if self._started:
            return
        if self._stopped:
            raise RuntimeError("a stopped WebhookNotifier cannot be restarted")
        self._started = True
        self._session = (
            self._session_factory() if self._session_factory else aiohttp.ClientSession()
        )
        for sender in self._senders:
            sender.task = asyncio.create_task(self._run(sender), name=f"webhook-sender {sender.url}")
        logger.info("webhooks: sending to %s", ", ".join(self.urls))

    async def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within `timeout` seconds, then cancel the senders and close."""
        if self._stopped:
            return
        self._closing = True
        self._stopped = True
        tasks = [s.task for s in self._senders if s.task is not None]
        for sender in self._senders:
            sender.wake.set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(timeout, 0))
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for sender in self._senders:
            sender.task = None
            lost = len(sender.queue) + (1 if sender.inflight is not None else 0)
            if lost:
                sender.stats.dropped += lost
                logger.warning("webhooks: %d event(s) for %s not delivered before stop", lost, sender.url)
            sender.queue.clear()
            sender.inflight = None
            sender.stats.queued = 0
        if self._session is not None:
            await self._session.close()
            self._session = None

    def stats(self) -> list[UrlStats]:
        """Per-URL counters (queue depth, sent, failed, dropped), e.g. for metrics."""
        return [s.stats for s in self._senders]

    @property
    def num_dropped(self) -> int:
        return sum(s.stats.dropped for s in self._senders)

    # -- sending -------------------------------------------------------------------------------

    async def _run(self, sender: _UrlSender) -> None:
        while True:
            if not sender.queue:
                if self._closing:
                    return
                sender.wake.clear()
                await sender.wake.wait()
                continue
            item = sender.queue.popleft()
            sender.stats.queued = len(sender.queue)
            sender.inflight = item
            try:
                await self._deliver(sender, item)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad event end the sender
                logger.exception("webhooks: unexpected error sending to %s", sender.url)
                sender.stats.failed += 1
            sender.inflight = None

    async def _deliver(self, sender: _UrlSender, item: _Item) -> None:
        body = item.body
        reported = sender.pending_dropped
        if reported:
            # Rare path: this receiver lost events, so it gets its own copy carrying the count.
            event = WebhookEvent()
            event.CopyFrom(item.event)
            event.num_dropped += reported
            body = encode_event(event)
            sender.pending_dropped = 0
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.max_attempts),
                wait=self._wait,
                retry=retry_if_exception(is_retryable),
                before_sleep=lambda state: self._log_retry(sender.url, item, state),
                reraise=True,
            ):
                with attempt:
                    await self._post(sender.url, body)
        except asyncio.CancelledError:
            sender.pending_dropped += reported
            raise
        except Exception as exc:
            sender.pending_dropped += reported  # the count was not delivered; report it next time
            sender.stats.failed += 1
            logger.warning(
                "webhooks: giving up on %s event %s to %s: %s",
                item.event.event, item.event.id, sender.url, str(exc) or type(exc).__name__,
            )
            return
        sender.stats.sent += 1
        if reported:
            logger.info("webhooks: told %s that %d event(s) were dropped", sender.url, reported)

    async def _post(self, url: str, body: bytes) -> None:
        assert self._session is not None
        await post_event(self._session, url, body, self._api_key, self._api_secret, self.timeout)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, WebhookDeliveryError) and exc.retry_after is not None:
            return min(exc.retry_after, self._backoff_max)
        return float(self._backoff(state))

    def _log_retry(self, url: str, item: _Item, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        logger.info(
            "webhooks: %s event %s to %s failed (attempt %d/%d): %s",
            item.event.event, item.event.id, url, state.attempt_number, self.max_attempts,
            (str(exc) or type(exc).__name__) if exc else "unknown error",
        )


class NullNotifier:
    """The notifier when no webhook URLs are configured: accepts events and sends nothing."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def notify(self, event: WebhookEvent) -> None:
        pass

    async def flush(self, timeout: float = 5.0) -> bool:
        return True

    async def start(self) -> None:
        pass

    async def stop(self, timeout: float = 5.0) -> None:
        pass

    def stats(self) -> list[UrlStats]:
        return []

    @property
    def num_dropped(self) -> int:
        return 0


def notifier_from_config(
    config: Config, session_factory: SessionFactory | None = None, *, redis=None, lease=None, owner: str = "",
) -> Notifier:
    """For `config.webhook.urls`, signed with `config.webhook_key`: the durable Redis outbox given a `redis` client
    (a cluster), else the in-memory `WebhookNotifier`; a `NullNotifier` without URLs."""
    signing = config.webhook_key
    if not config.webhook.urls or signing is None:
        return NullNotifier()
    api_key, api_secret = signing
    hooks = config.webhook
    if redis is not None:
        from braid.shared.outbox import RedisOutbox

        return RedisOutbox(redis, config.redis.key_prefix, hooks.urls, api_key, api_secret, lease, owner,
                           timeout=hooks.timeout, retention=hooks.retention, max_events=hooks.max_events,
                           backoff_max=hooks.retry_max_interval, session_factory=session_factory)
    return WebhookNotifier(
        config.webhook.urls,
        api_key,
        api_secret,
        timeout=config.webhook.timeout,
        max_attempts=config.webhook.max_attempts,
        session_factory=session_factory,
    )
