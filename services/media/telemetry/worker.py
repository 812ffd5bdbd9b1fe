"""The stats worker of one participant in one room.

A worker outlives any single connection: it closes only when the last guard is released, and it remembers whether
the participant ever became active (`connected`) and whether its final webhook went out (`left_sent`). Both facts
are carried into a successor worker, because the `participant_left` decision depends on them and losing them is
exactly how LiveKit lost `participant_left` webhooks after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

from livekit.protocol import models

from .guard import ReferenceCount, ReferenceGuard
from .stats import Direction, StatsRecord, TrackStats

_KIND_NAMES = {models.TrackType.AUDIO: "audio", models.TrackType.VIDEO: "video", models.TrackType.DATA: "data"}


@dataclass(frozen=True)
class WorkerKey:
    """Workers are keyed by room and participant: a forwarded participant can be in two rooms at once."""

    room: str
    participant_sid: str

    @classmethod
    def of(cls, room: models.Room, participant_sid: str) -> WorkerKey:
        # The name identifies a live room for every caller (a signal node may not know the sid yet).
        return cls(room.name or room.sid, participant_sid)


class StatsWorker:
    """Collects one participant's per-track stats and owns its reference count."""

    def __init__(self, key: WorkerKey, room: models.Room, participant: models.ParticipantInfo, created_at: float):
        self.key = key
        self.room = room
        self.participant = participant
        self.created_at = created_at
        self.closed_at: float | None = None
        self.connected = False  # became ACTIVE at least once, in this worker or a predecessor
        self.left_sent = False  # participant_left / connection_aborted already emitted for this participant
        self.refs = ReferenceCount(owner=self)
        self._last_flush = created_at
        self._stats: dict[Direction, dict[str, TrackStats]] = {Direction.UPSTREAM: {}, Direction.DOWNSTREAM: {}}
        self._tracks: dict[str, tuple[str, str]] = {}  # track sid -> (kind, mime)

    def __repr__(self) -> str:
        return (f"StatsWorker({self.key.room}/{self.key.participant_sid} refs={self.refs.value} "
                f"connected={self.connected} closed_at={self.closed_at})")

    # --- hot path: called by media forwarding with deltas since its previous call -----------------------------

    def on_upstream(self, track_sid: str, packets: int = 0, bytes: int = 0, packets_lost: int = 0, nacks: int = 0,
                    plis: int = 0, firs: int = 0, jitter: float = 0.0, rtt: int = 0, layer: int = -1,
                    score: float = 0.0) -> None:
        """Media received from this participant on `track_sid` (jitter in ms, rtt in ms, score 1..5 or 0)."""
        self._track(Direction.UPSTREAM, track_sid).add(packets, bytes, packets_lost, nacks, plis, firs, jitter, rtt,
                                                       layer, score)

    def on_downstream(self, track_sid: str, packets: int = 0, bytes: int = 0, packets_lost: int = 0,
                      nacks: int = 0, plis: int = 0, firs: int = 0, jitter: float = 0.0, rtt: int = 0,
                      layer: int = -1, score: float = 0.0) -> None:
        """Media of `track_sid` forwarded to this participant."""
        self._track(Direction.DOWNSTREAM, track_sid).add(packets, bytes, packets_lost, nacks, plis, firs, jitter,
                                                         rtt, layer, score)

    def _track(self, direction: Direction, track_sid: str) -> TrackStats:
        tracks = self._stats[direction]
        stats = tracks.get(track_sid)
        if stats is None:  # one allocation per track, not per packet
            stats = tracks[track_sid] = TrackStats()
        return stats

    # --- state --------------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    @property
    def ref_count(self) -> int:
        return self.refs.value

    def update(self, room: models.Room | None = None, participant: models.ParticipantInfo | None = None) -> None:
        """Keep the latest room/participant details for records and late events."""
        if room is not None:
            self.room = room
        if participant is not None:
            self.participant = participant

    def set_track(self, track: models.TrackInfo) -> None:
        self._tracks[track.sid] = (_KIND_NAMES.get(track.type, ""), track.mime_type)

    def set_connected(self) -> None:
        self.connected = True

    def inherit(self, predecessor: StatsWorker) -> None:
        """Carry what must survive a worker generation (always, whoever creates the successor)."""
        self.connected = self.connected or predecessor.connected
        self.left_sent = self.left_sent or predecessor.left_sent
        self._tracks.update(predecessor._tracks)

    def acquire(self, guard: ReferenceGuard) -> bool:
        """Take the guard's reference; refused for a closed worker, a spent guard or an already active one."""
        if self.closed:
            return False
        return self.refs.acquire(guard)

    def close(self, guard: ReferenceGuard | None, now: float) -> bool:
        """Release `guard`; the worker closes (and records `closed_at`) only when the count reaches zero.

        Returns True only for the call that closed it. A None guard never closes anything.
        """
        if guard is None:
            return False
        if self.refs.release(guard) and self.closed_at is None:
            self.closed_at = now
            return True
        return False

    def expire_orphan(self, now: float, delay: float) -> bool:
        """Close a worker nobody ever referenced (created by a resume that no holder followed) after `delay`.

        An open worker with a zero count can only be such an orphan, since releasing the last reference closes it;
        without this it would never be reaped.
        """
        if self.closed_at is None and self.refs.value == 0 and now - self.created_at >= delay:
            self.closed_at = now
            return True
        return False

    def reapable(self, now: float, delay: float) -> bool:
        """Closed long enough ago that late events (e.g. a final track_unpublished) have had time to arrive."""
        return self.closed_at is not None and now - self.closed_at >= delay

    # --- flush --------------------------------------------------------------------------------------------------

    def flush(self, now: float) -> list[StatsRecord]:
        """Read out and reset every track with activity since the previous flush."""
        records: list[StatsRecord] = []
        start, self._last_flush = self._last_flush, now
        for direction, tracks in self._stats.items():
            for track_sid, stats in tracks.items():
                if stats.empty:
                    continue
                kind, mime = self._tracks.get(track_sid, ("", ""))
                records.append(StatsRecord.from_stats(
                    stats, room_id=self.room.sid, room_name=self.room.name, participant_sid=self.key.participant_sid,
                    identity=self.participant.identity, track_sid=track_sid, direction=direction, kind=kind,
                    mime=mime, start_time=start, end_time=now,
                ))
                stats.reset()
        return records
