"""Sealing relay keys: a link's SRTP master keys cross the internal gRPC sealed with the cluster key.

Every node of a cluster is configured with the same API key/secret pairs; the cluster key is derived from them,
so only such a node can open a relay link (the origin refuses keys it cannot unseal) or read a link's keys off
the wire. The sealed keys are bound to the opening node's id, so they cannot be replayed under another name.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE = 12


class SealError(ValueError):
    """Sealed keys that this cluster key cannot open: the peer is not part of this cluster."""


def cluster_key(keys: Mapping[str, str]) -> bytes:
    material = "\n".join(f"{k}:{keys[k]}" for k in sorted(keys)).encode()
    return hmac.new(material, b"braid relay link keys v1", hashlib.sha256).digest()


def seal(key: bytes, secret: bytes, node_id: str) -> bytes:
    nonce = os.urandom(NONCE)
    return nonce + AESGCM(key).encrypt(nonce, secret, node_id.encode())


def unseal(key: bytes, sealed: bytes, node_id: str) -> bytes:
    if len(sealed) <= NONCE:
        raise SealError("sealed key too short")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE], sealed[NONCE:], node_id.encode())
    except InvalidTag:
        raise SealError("relay keys not sealed with this cluster's key") from None
