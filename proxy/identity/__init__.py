"""Identity: Ed25519 keys, NodeIds, Polykey-compatible certificates, chain verification, TLS
config. No trio here, nothing from the other layers."""
