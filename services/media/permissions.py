"""Who may subscribe to a publisher's tracks: LiveKit's `UpdateSubscriptionPermission`.

A publisher starts open to everyone. `all_participants` opens it again; otherwise only the listed subscribers
may receive its tracks, each either all of them (`all_tracks`) or the listed `track_sids`. A subscriber is named
by identity, or by sid (resolved to its identity when the update arrives, as LiveKit does; an unknown sid is
skipped). The resolved rules travel to the other media nodes of the room, which enforce them for their own
subscribers.
"""

from __future__ import annotations

from typing import Callable

from livekit.protocol import rtc as rtc_pb


class InvalidPermission(ValueError):
    """A track permission that names no subscriber."""


class SubscriptionPermission:
    """One publisher's rules (shared by all its tracks, local or relayed)."""

    def __init__(self) -> None:
        self.allowed: dict[str, tuple[bool, frozenset[str]]] | None = None  # identity → (all tracks, track sids)

    def allows(self, track_sid: str, identity: str) -> bool:
        if self.allowed is None:
            return True
        rule = self.allowed.get(identity)
        return rule is not None and (rule[0] or track_sid in rule[1])

    def update(self, update: rtc_pb.SubscriptionPermission, identity_of: Callable[[str], str | None]) -> None:
        """Replace the rules (raises `InvalidPermission`, keeping the old ones, when a permission names nobody)."""
        if update.all_participants:
            self.allowed = None
            return
        allowed: dict[str, tuple[bool, frozenset[str]]] = {}
        for perm in update.track_permissions:
            identity = perm.participant_identity
            if not identity:
                if not perm.participant_sid:
                    raise InvalidPermission("a track permission needs a participant identity or sid")
                identity = identity_of(perm.participant_sid)
                if identity is None:
                    continue
            allowed[identity] = (perm.all_tracks, frozenset(perm.track_sids))
        self.allowed = allowed

    def to_proto(self) -> rtc_pb.SubscriptionPermission:
        """The resolved rules (identities only), as another node applies them."""
        if self.allowed is None:
            return rtc_pb.SubscriptionPermission(all_participants=True)
        return rtc_pb.SubscriptionPermission(track_permissions=[
            rtc_pb.TrackPermission(participant_identity=identity, all_tracks=all_tracks, track_sids=sorted(sids))
            for identity, (all_tracks, sids) in sorted(self.allowed.items())
        ])

    def apply_proto(self, resolved: rtc_pb.SubscriptionPermission) -> bool:
        """Rules resolved by the publisher's node; True when they changed."""
        before = self.allowed
        self.update(resolved, lambda sid: None)
        return before != self.allowed
