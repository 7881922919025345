"""Live reload of a running node: `keynode reload`, SIGHUP and `POST /v1/reload`.

The config file the node started from is read again and validated whole (its
[[policy_tests]] included). A config that fails is rejected with the usual
precise ConfigError and the running config stays. Otherwise the services, allow
lists ([server], [services], [forward] allow_targets) and [peers] take effect at
once: new tunnel starts use them, and live tunnels whose NodeId lost access are
closed with the end reason `revoked` (Proxy.set_policy); every other tunnel keeps
flowing. Sections that need a restart (addresses, timeouts, transport, tls, log,
control, auth, grpc_web) are not applied; the answer names those that changed.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from typing import Any, Protocol

import trio

from proxy.app.config import Config, default_config, load_config
from proxy.identity.errors import KeynodeError
from proxy.tunnel.address_book import AddressBook


class NodeController(Protocol):
    """What a reload needs of runner.NodeController: the Proxy and its config."""

    proxy: Any
    config: Config

log = logging.getLogger("keynode.reload")

# Config fields a reload does not apply (they are bound or in use), by what says so.
RESTART_ONLY = {
    "forward": "[forward] host/port",
    "proxy": "[proxy]",
    "timeouts": "[timeouts]",
    "congestion": "[transport]",
    "max_chain_length": "[tls]",
    "log_level": "[log]",
    "log_format": "[log]",
    "control_socket": "[control]",
    "node_dir": "[node]",
    "grpc_web": "[grpc_web]",
}


def read_again(config: Config) -> Config:
    """The node's config file read and validated again (ConfigError); the auth token
    is not re-read (a restart applies it)."""
    if config.path == "<defaults>":
        fresh = default_config(config.node_dir, read_auth=False)
    else:
        fresh = load_config(config.path, read_auth=False, node_dir=config.node_dir)
    return dataclasses.replace(fresh, auth=config.auth)


def _update_peers(address_book: Any, old: Config, new: Config) -> None:
    """[peers] into the Proxy's address book, leaving entries others added alone."""
    if not isinstance(address_book, AddressBook):
        return
    for node_id in set(old.peers) - set(new.peers):
        address_book.remove(node_id)
    for node_id, peer in new.peers.items():
        address_book.set(node_id, peer.host, peer.port)


def reload_node(controller: NodeController) -> dict[str, Any]:
    """Apply the config file to the running node; the answer document, or ConfigError."""
    old = controller.config
    new = read_again(old)
    restart = sorted({what for name, what in RESTART_ONLY.items() if getattr(old, name) != getattr(new, name)})
    proxy = controller.proxy
    revoked = proxy.set_policy(new.policy)
    _update_peers(proxy.address_book, old, new)
    controller.config = dataclasses.replace(new, **{name: getattr(old, name) for name in RESTART_ONLY})
    services = new.policy.describe()
    log.info(
        "config reloaded: %d services, %d peers, %d tunnels revoked%s",
        len(services), len(new.peers), revoked,
        f"; not applied until a restart: {', '.join(restart)}" if restart else "",
        extra={"fields": {"event": "reloaded", "services": len(services), "peers": len(new.peers),
                          "revoked": revoked, "restart_needed": restart}},
    )
    return {"services": services, "peers": len(new.peers), "revoked": revoked, "restart_needed": restart}


async def reload_on_sighup(
    controller: NodeController, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """SIGHUP means reload (main thread only: where signals are delivered); a
    rejected config is logged and the node carries on with the running one."""
    if threading.current_thread() is not threading.main_thread():
        task_status.started()
        await trio.sleep_forever()
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            try:
                reload_node(controller)
            except KeynodeError as error:
                log.error("reload on SIGHUP rejected, the running config stays: %s", error,
                          extra={"fields": {"event": "reload_rejected", "error": str(error)}})
