"""Rendezvous: authenticated keyed messages, relay-node discovery and introductions,
coordinated punching (sans-IO cores, one thin trio driver). See docs/architecture.md."""
