"""The relay: forwarding datagrams between registered nodes (issue 14).

frames (the codec), limits, forwarding (the server core), session (a client's
state), serve (the TCP + mutual TLS server), link (the client link). Sans-IO cores,
thin trio drivers; see docs/architecture.md, "Relay".
"""
