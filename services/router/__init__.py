"""The router: room directory, placement of participants on media nodes, room lifecycle."""
