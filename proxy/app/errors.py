"""Errors of the application: config, CLI, control socket, port forwarding."""

from __future__ import annotations

from proxy.identity.errors import KeynodeError

# --- config, CLI, control socket, port forwarding (owner: cli) ---------------------


class ConfigError(KeynodeError):
    """A config file is unreadable, not TOML, or has an unknown or invalid key."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        super().__init__(f"{path}: {key}: {reason}")
        self.path = path
        self.key = key
        self.reason = reason


class PolicyTestFailed(ConfigError):
    """A `[[policy_tests]]` entry does not hold for the config's services: the config
    is rejected (at start and at reload)."""


class NodeDirectoryError(KeynodeError):
    """The node directory has no identity, or keygen would overwrite one."""


class ControlError(KeynodeError):
    """The control socket is unreachable or answered with an error."""


class ControlUnreachable(ControlError):
    """No node answers on the control socket (is `keynode run` running?)."""


class ControlRequestFailed(ControlError):
    """The node refused or failed a control request."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"{error}: {message}")
        self.status = status
        self.error = error
        self.message = message


class PortForwardError(KeynodeError):
    """A tunnelled connection of `keynode forward` could not be set up."""


class GrpcWebBindError(KeynodeError, OSError):
    """The `[grpc_web]` listen address could not be bound."""


class EventStreamError(KeynodeError):
    """The node cannot give this client an event stream (`GET /v1/events`)."""

    http_status = 503


class TooManySubscribers(EventStreamError):
    """Every event stream slot is taken; one must end before another starts."""


class EventHubClosed(EventStreamError):
    """The node is stopping: no new event streams."""
