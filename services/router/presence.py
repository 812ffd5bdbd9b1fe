"""A router's entry in the registry (role "router"): signal edges find routers there and fail over between them."""

from __future__ import annotations

import asyncio
import logging

from braid.shared.store import NodeInfo, NodeRegistry

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 2.0
HEARTBEAT_TTL = 6.0


class RouterPresence:
    def __init__(self, registry: NodeRegistry, node_id: str, address: str, region: str = ""):
        self.registry = registry
        self.info = NodeInfo(node_id=node_id, role="router", address=address, region=region)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="router-presence")

    async def stop(self) -> None:
        """Leave the registry first, so edges stop choosing this router before it stops answering."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await asyncio.wait_for(self.registry.remove(self.info.node_id), 2.0)
        except Exception as exc:
            log.warning("could not deregister router %s: %r", self.info.node_id, exc)

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.registry.heartbeat(self.info, HEARTBEAT_TTL)
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("router heartbeat failed (%r); retrying", exc)
                failing = True
            await asyncio.sleep(HEARTBEAT_INTERVAL)
