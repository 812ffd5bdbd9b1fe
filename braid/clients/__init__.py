"""Client-side tools built on the official LiveKit Python SDK: `braid join-room` and generated demo media."""
