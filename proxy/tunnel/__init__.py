"""The tunnel: the HTTP CONNECT edge, peers, forward and reverse connections with one
lifecycle, the TCP <-> tunnel splice, and the Proxy facade."""
