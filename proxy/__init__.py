"""keynode appliance layer: identity, TLS, the HTTP CONNECT forward proxy, the reverse proxy."""

from proxy.errors import *  # noqa: F401,F403
from proxy.node_id import NodeId  # noqa: F401
from proxy.keys import generate_key_pair, load_private_key, save_private_key  # noqa: F401
from proxy.certificates import generate_certificate, renew_certificate, rotate_key, chain_to_pem, chain_from_pem, certificate_node_id  # noqa: F401
from proxy.tls_config import TLSConfig  # noqa: F401
from proxy.verification import verify_client_certificate_chain, verify_server_certificate_chain  # noqa: F401
from proxy.tls import TLSStream, open_tls_stream  # noqa: F401
from proxy.proxy import Proxy, open_proxy  # noqa: F401
