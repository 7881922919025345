"""keynode appliance layer, in four sub-packages (docs/architecture.md):

- ``proxy.identity``: keys, NodeIds, certificates, chain verification (no trio);
- ``proxy.tls``: TLS over any trio stream;
- ``proxy.tunnel``: the CONNECT edge, peers, connections, the splice, the ``Proxy``;
- ``proxy.app``: config, CLI, runner, control socket, port forwarding, demo.

The public names below load on first use, so importing ``proxy.identity`` alone
does not pull in trio. Module paths from before the layout (``proxy.proxy``,
``proxy.tls_config``, ``proxy.cli``, ...) stay importable, also with ``python -m``,
for scripts and tests written against them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

# public name -> module defining it
_PUBLIC = {
    "NodeId": "proxy.identity.node_id",
    "generate_key_pair": "proxy.identity.keys",
    "load_private_key": "proxy.identity.keys",
    "save_private_key": "proxy.identity.keys",
    "generate_certificate": "proxy.identity.certificates",
    "renew_certificate": "proxy.identity.certificates",
    "rotate_key": "proxy.identity.certificates",
    "chain_to_pem": "proxy.identity.certificates",
    "chain_from_pem": "proxy.identity.certificates",
    "certificate_node_id": "proxy.identity.certificates",
    "TLSConfig": "proxy.identity.tls_config",
    "verify_client_certificate_chain": "proxy.identity.verification",
    "verify_server_certificate_chain": "proxy.identity.verification",
    "TLSStream": "proxy.tls",
    "open_tls_stream": "proxy.tls",
    "Proxy": "proxy.tunnel.proxy",
    "open_proxy": "proxy.tunnel.proxy",
    "Service": "proxy.tunnel.services",
    "ServicePolicy": "proxy.tunnel.services",
    "CallerIdentity": "proxy.tunnel.records",
}

# module path before the layout -> where it lives now
LEGACY_MODULES = {
    "proxy.node_id": "proxy.identity.node_id",
    "proxy.keys": "proxy.identity.keys",
    "proxy.certificates": "proxy.identity.certificates",
    "proxy.verification": "proxy.identity.verification",
    "proxy.tls_config": "proxy.identity.tls_config",
    "proxy.proxy": "proxy.tunnel.proxy",
    "proxy.cli": "proxy.app.cli",
    "proxy.config": "proxy.app.config",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    else:
        errors = importlib.import_module("proxy.errors")
        if not (name[:1].isupper() and hasattr(errors, name)):
            raise AttributeError(f"module 'proxy' has no attribute {name!r}")
        value = getattr(errors, name)
    globals()[name] = value
    return value


class _LegacyModuleLoader(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Serves an old module path as the module that now holds its code.

    ``exec_module`` puts the real module into ``sys.modules`` under the old name; the
    import system returns what ``sys.modules`` holds, so both names are one object.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in LEGACY_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        sys.modules[module.__name__] = importlib.import_module(LEGACY_MODULES[module.__name__])

    def is_package(self, fullname: str) -> bool:
        return False

    def get_source(self, fullname: str) -> str:
        # `python -m proxy.cli` runs the new module as __main__.
        return f"import runpy\nrunpy.run_module({LEGACY_MODULES[fullname]!r}, run_name='__main__', alter_sys=True)\n"


if not any(isinstance(finder, _LegacyModuleLoader) for finder in sys.meta_path):
    sys.meta_path.append(_LegacyModuleLoader())
