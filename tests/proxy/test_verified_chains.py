"""The cache of verified certificate chains (proxy.tunnel.connection.VerifiedChains)."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.errors import CertChainDateInvalid, CertChainUnclaimed
from proxy.identity.certificates import generate_certificate
from proxy.identity.keys import generate_key_pair
from proxy.identity.node_id import NodeId
from proxy.identity.verification import verify_client_certificate_chain, verify_server_certificate_chain
from proxy.tunnel.connection import VerifiedChains


def counting(verify):  # type: ignore[no-untyped-def]
    calls = []

    def wrapped(chain: list[x509.Certificate]) -> NodeId:
        calls.append(chain)
        return verify(chain)

    return wrapped, calls


def test_a_verified_chain_is_reused_for_the_same_question() -> None:
    key = generate_key_pair()
    chain = [generate_certificate(key)]
    node_id = NodeId.from_public_key(key.public_key())
    cache = VerifiedChains()
    verify, calls = counting(verify_client_certificate_chain)
    assert cache.verify("client", chain, verify) == node_id
    # A chain parsed afresh from the same bytes (as each handshake does) hits.
    same = [x509.load_pem_x509_certificate(chain[0].public_bytes(Encoding.PEM))]
    assert cache.verify("client", same, verify) == node_id
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    # Another question about the same chain is verified on its own.
    server_verify, server_calls = counting(lambda c: verify_server_certificate_chain([node_id], c))
    assert cache.verify(("server", frozenset([node_id])), chain, server_verify) == node_id
    assert len(server_calls) == 1


def test_failures_are_not_cached() -> None:
    key = generate_key_pair()
    chain = [generate_certificate(key)]
    other = NodeId.from_public_key(generate_key_pair().public_key())
    cache = VerifiedChains()
    verify, calls = counting(lambda c: verify_server_certificate_chain([other], c))
    for _ in range(2):
        with pytest.raises(CertChainUnclaimed):
            cache.verify(("server", frozenset([other])), chain, verify)
    assert len(calls) == 2


def test_an_entry_is_used_only_within_the_chains_validity() -> None:
    key = generate_key_pair()
    chain = [generate_certificate(key)]
    cache = VerifiedChains()
    verify, calls = counting(verify_client_certificate_chain)
    cache.verify("client", chain, verify)
    ((key_, (node_id, valid_from, valid_until)),) = cache._entries.items()
    assert (valid_from, valid_until) == (chain[0].not_valid_before_utc, chain[0].not_valid_after_utc)
    # As if the clock had moved past the end of the window: verified afresh.
    cache._entries[key_] = (node_id, valid_from, datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1))
    assert cache.verify("client", chain, verify) == node_id
    assert len(calls) == 2


def test_an_expired_chain_fails_even_after_it_was_cached() -> None:
    key = generate_key_pair()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2)
    chain = [generate_certificate(key, duration=3600, not_before=past)]
    cache = VerifiedChains()
    # A verdict cached while it was in date must not outlive the certificate.
    cache._entries[("client", (chain[0].public_bytes(Encoding.DER),))] = (
        NodeId.from_public_key(key.public_key()),
        chain[0].not_valid_before_utc,
        chain[0].not_valid_after_utc,
    )
    with pytest.raises(CertChainDateInvalid):
        cache.verify("client", chain, verify_client_certificate_chain)


def test_capacity_bounds_the_cache() -> None:
    cache = VerifiedChains(capacity=3)
    chains = [[generate_certificate(generate_key_pair())] for _ in range(5)]
    for chain in chains:
        cache.verify("client", chain, verify_client_certificate_chain)
    assert len(cache._entries) == 3
    verify, calls = counting(verify_client_certificate_chain)
    cache.verify("client", chains[0], verify)  # evicted: verified again
    assert len(calls) == 1
