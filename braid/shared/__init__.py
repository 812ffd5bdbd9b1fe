"""What the signal, media and router services share: config, auth, ids, store, bus, wire helpers."""
