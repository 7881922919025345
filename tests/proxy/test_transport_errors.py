"""TRANSPORT_ERRORS ("the other end or the path went away") holds no local error
(issue item 12): keynode's own errors (a KeynodeError that is not also a broken
transport) are defects or decisions of this node, and must not be reported as a
peer reset."""

from __future__ import annotations

import trio

from nat.errors import UtpConnectionReset, UtpTimeout
from proxy.identity.errors import CertChainBrokenLink, KeynodeError, NodeIdInvalid
from proxy.tls.errors import TLSBusyError, TLSHandshakeError, TLSProtocolError, TLSTruncatedError
from proxy.tunnel.connection import TRANSPORT_ERRORS
from proxy.tunnel.errors import ConnectionStartError, ProxyNotRunning


def test_transport_errors_are_the_path_going_away() -> None:
    for error in (
        trio.BrokenResourceError,
        trio.ClosedResourceError,
        ConnectionResetError,
        OSError,
        UtpConnectionReset,
        UtpTimeout,
        TLSHandshakeError,  # "transport broke during the TLS handshake"
        TLSProtocolError,
        TLSTruncatedError,
    ):
        assert issubclass(error, TRANSPORT_ERRORS), error


def test_keynodes_own_errors_are_not_transport_errors() -> None:
    assert KeynodeError not in TRANSPORT_ERRORS
    for error in (KeynodeError, ProxyNotRunning, ConnectionStartError, CertChainBrokenLink, NodeIdInvalid, TLSBusyError):
        assert not issubclass(error, TRANSPORT_ERRORS), error


def test_a_fault_of_our_own_is_reported_as_itself_not_as_a_peer_reset() -> None:
    from proxy.tunnel.errors import ConnectionResetByPeer
    from proxy.tunnel.splice import PipeOutcome

    broken = trio.BrokenResourceError("reset by peer")
    reported = PipeOutcome(error=broken).reported_error
    assert isinstance(reported, ConnectionResetByPeer) and reported.__cause__ is broken

    bug = AttributeError("'NoneType' object has no attribute 'send'")
    assert PipeOutcome(error=bug).reported_error is bug
    assert PipeOutcome(error=ProxyNotRunning("stopping")).reported_error.__class__ is ProxyNotRunning
