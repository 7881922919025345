"""Tests of the keynode CLI, config, control socket and port forwarding."""
