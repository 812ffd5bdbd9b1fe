"""Redis implementations of the store, node registry and bus, for a cluster.

Keys live under `<prefix>:`; the keys of one room share the hash tag `{room:<name>}` so the
operations touching several of them stay in one Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import AsyncIterator, Sequence

import redis.asyncio as aioredis
from livekit.protocol import models
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff

from braid.shared.bus import Bus, Subscription
from braid.shared.config import RedisConfig
from braid.shared.store import NodeInfo, NodeRegistry, RoomStore, newest_per_identity, session_order

log = logging.getLogger(__name__)


def connect(config: RedisConfig) -> aioredis.Redis:
    common = dict(
        username=config.username or None,
        password=config.password or None,
        db=config.db,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        health_check_interval=10,
        # A few quick reconnects, not redis-py's default 10 (about 3 s against a stopped server): a call fails
        # fast while Redis is down, and every caller already handles a failed store call.
        retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=3),
    )
    if config.sentinel_addresses:
        sentinels = []
        for address in config.sentinel_addresses:
            host, _, port = address.rpartition(":")
            sentinels.append((host or "127.0.0.1", int(port or 26379)))
        sentinel = Sentinel(
            sentinels,
            sentinel_kwargs={
                "username": config.sentinel_username or None,
                "password": config.sentinel_password or None,
                "socket_timeout": 2.0,
            },
            ssl=config.use_tls,
        )
        return sentinel.master_for(config.sentinel_master_name or "mymaster", **common)
    host, _, port = config.address.rpartition(":")
    return aioredis.Redis(host=host or "127.0.0.1", port=int(port or 6379), ssl=config.use_tls, **common)


class RedisStore(RoomStore):
    def __init__(self, client: aioredis.Redis, prefix: str):
        self.r = client
        self.prefix = prefix

    def _room_key(self, name: str, part: str = "info") -> str:
        return f"{self.prefix}:{{room:{name}}}:{part}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}:rooms"

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    async def create_room(self, room: models.Room) -> tuple[models.Room, bool]:
        created = await self.r.set(self._room_key(room.name), room.SerializeToString(), nx=True)
        await self.r.sadd(self._index, room.name)
        if created:
            return room, True
        existing = await self.get_room(room.name)
        return (existing or room), False

    async def get_room(self, name: str) -> models.Room | None:
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.get(self._room_key(name))
            pipe.hvals(self._room_key(name, "participants"))
            raw, people = await pipe.execute()
        if raw is None:
            return None
        room = models.Room.FromString(raw)
        infos = newest_per_identity([models.ParticipantInfo.FromString(p) for p in people])
        room.num_participants = sum(1 for p in infos if not p.permission.hidden)
        room.num_publishers = sum(1 for p in infos if p.is_publisher)
        return room

    async def list_rooms(self, names: list[str] | None = None) -> list[models.Room]:
        wanted = names if names else sorted(n.decode() for n in await self.r.smembers(self._index))
        rooms = []
        for name in wanted:
            room = await self.get_room(name)
            if room is not None:
                rooms.append(room)
            elif not names:
                await self.r.srem(self._index, name)
        rooms.sort(key=lambda r: r.creation_time_ms)
        return rooms

    async def update_room(self, room: models.Room) -> bool:
        stored = room.__class__()
        stored.CopyFrom(room)
        stored.num_participants = 0
        stored.num_publishers = 0
        return bool(await self.r.set(self._room_key(room.name), stored.SerializeToString(), xx=True))

    async def delete_room(self, name: str) -> bool:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self._room_key(name))
            pipe.delete(self._room_key(name, "participants"))
            pipe.delete(self._room_key(name, "nodes"))
            removed, _, _ = await pipe.execute()
        await self.r.srem(self._index, name)
        return bool(removed)

    async def put_participant(self, room: str, info: models.ParticipantInfo) -> None:
        await self.r.hset(self._room_key(room, "participants"), info.sid, info.SerializeToString())

    async def delete_participant(self, room: str, identity: str, sid: str) -> bool:
        if not sid:
            raise ValueError("delete_participant needs the sid of the session to remove")
        return bool(await self.r.hdel(self._room_key(room, "participants"), sid))

    async def list_sessions(self, room: str) -> list[models.ParticipantInfo]:
        people = [models.ParticipantInfo.FromString(p) for p in await self.r.hvals(self._room_key(room, "participants"))]
        return sorted(people, key=session_order)

    async def room_nodes(self, room: str) -> dict[str, str]:
        raw = await self.r.hgetall(self._room_key(room, "nodes"))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def claim_room_node(self, room: str, node_id: str, token: str, if_absent: bool = False) -> bool:
        key = self._room_key(room, "nodes")
        if if_absent:
            await self.r.hsetnx(key, node_id, token)
            return (await self.r.hget(key, node_id)) == token.encode()
        await self.r.hset(key, node_id, token)
        return True

    # Compare-and-delete: remove the claim only while it still holds the releaser's token.
    _RELEASE_IF_OWNER = """
    if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
    return 0
    """

    async def release_room_node(self, room: str, node_id: str, token: str) -> bool:
        return bool(await self.r.eval(self._RELEASE_IF_OWNER, 1, self._room_key(room, "nodes"), node_id, token))

    async def mark_moved(self, room: str, identity: str, sid: str, ttl: float,
                         tracks: Sequence[models.TrackInfo] = ()) -> None:
        moved = models.ParticipantInfo(sid=sid, tracks=tracks).SerializeToString()
        await self.r.set(self._room_key(room, f"moved:{identity}"), moved, px=max(1, int(ttl * 1000)))

    # Take the lease if free, renew it if ours: SET NX PX, or PEXPIRE when the value is our owner id.
    _LEASE = """
    if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
    if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
    return 0
    """

    async def try_lease(self, name: str, owner: str, ttl: float) -> bool:
        key = f"{self.prefix}:lease:{name}"
        return bool(await self.r.eval(self._LEASE, 1, key, owner, max(1, int(ttl * 1000))))

    async def take_moved(self, room: str, identity: str) -> models.ParticipantInfo | None:
        raw = await self.r.getdel(self._room_key(room, f"moved:{identity}"))
        return models.ParticipantInfo.FromString(raw) if raw else None

    async def close(self) -> None:
        await self.r.aclose()


class RedisRegistry(NodeRegistry):
    def __init__(self, client: aioredis.Redis, prefix: str):
        self.r = client
        self.prefix = prefix

    def _key(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"

    async def heartbeat(self, node: NodeInfo, ttl: float) -> None:
        node.updated_at = time.time()
        body = json.dumps(dataclasses.asdict(node))
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.set(self._key(node.node_id), body, px=int(ttl * 1000))
            pipe.sadd(f"{self.prefix}:nodes", node.node_id)
            await pipe.execute()

    async def remove(self, node_id: str) -> None:
        await self.r.delete(self._key(node_id))
        await self.r.srem(f"{self.prefix}:nodes", node_id)

    async def nodes(self, role: str | None = None) -> list[NodeInfo]:
        ids = sorted(n.decode() for n in await self.r.smembers(f"{self.prefix}:nodes"))
        if not ids:
            return []
        values = await self.r.mget([self._key(i) for i in ids])
        found = []
        for node_id, raw in zip(ids, values):
            if raw is None:  # expired: its heartbeats stopped
                await self.r.srem(f"{self.prefix}:nodes", node_id)
                continue
            node = NodeInfo(**json.loads(raw))
            if role is None or node.role == role:
                found.append(node)
        return found


class _RedisSubscription(Subscription):
    def __init__(self, pubsub):
        self._pubsub = pubsub

    async def _iterate(self) -> AsyncIterator[bytes]:
        while True:
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except (aioredis.ConnectionError, aioredis.TimeoutError):
                # Redis is away: wait and let redis-py reconnect and resubscribe.
                await asyncio.sleep(0.5)
                continue
            except RuntimeError:  # closed
                return
            if message is not None and message.get("type") == "message":
                yield message["data"]

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def close(self) -> None:
        try:
            await self._pubsub.aclose()
        except Exception:  # the connection may already be gone
            pass


class RedisBus(Bus):
    def __init__(self, client: aioredis.Redis, prefix: str):
        self.r = client
        self.prefix = prefix

    async def publish(self, channel: str, data: bytes) -> None:
        await self.r.publish(f"{self.prefix}:bus:{channel}", data)

    async def subscribe(self, channel: str) -> Subscription:
        pubsub = self.r.pubsub()
        await pubsub.subscribe(f"{self.prefix}:bus:{channel}")
        return _RedisSubscription(pubsub)


def redis_backends(config: RedisConfig):
    from braid.backends import Backends

    from braid.shared.redis_agents import RedisAgentStore

    client = connect(config)
    return Backends(
        store=RedisStore(client, config.key_prefix),
        agents=RedisAgentStore(client, config.key_prefix),
        registry=RedisRegistry(client, config.key_prefix),
        bus=RedisBus(client, config.key_prefix),
        redis=client,
    )
