"""Verifying a peer's certificate chain (leaf first), Polykey rules plus two fixes.

Each certificate examined must: be in date; have a subject CN that is an encoded
NodeId; have an Ed25519 key *equal to that NodeId* (fix 1: the original never
compared them, so anyone could claim any NodeId); carry a valid node signature by
that key; and have a valid outer signature by the key its issuer CN names (fix 2:
the original never checks the claiming certificate's own signature). Between
examined neighbours, chain[i] must be issued by chain[i+1] (names) and signed by
its key.

A chain longer than ``max_chain_length`` (default 32) is refused before anything
else is checked: each certificate costs two signature checks, and a peer must not
choose how much work a handshake costs. One key rotation adds one certificate.

Server side (the connecting node knows which NodeIds it wants) examines the chain
from the leaf up to the first certificate claiming a wanted NodeId. Client side
(the accepting node knows none) examines the whole chain and returns the leaf's.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import ParamSpec, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import SignatureAlgorithmOID

from proxy.identity.certificates import (
    certificate_issuer_node_id,
    certificate_node_id,
    verify_node_signature,
    verify_signed_by,
)
from proxy.identity.errors import (
    CertChainBrokenLink,
    CertChainDateInvalid,
    CertChainEmpty,
    CertChainKeyInvalid,
    CertChainMalformed,
    CertChainNameInvalid,
    CertChainNoNodeIds,
    CertChainSignatureInvalid,
    CertChainTooLong,
    CertChainUnclaimed,
    NodeIdInvalid,
)
from proxy.identity.node_id import NodeId

DEFAULT_MAX_CHAIN_LENGTH = 32


def verify_server_certificate_chain(
    node_ids: Iterable[NodeId],
    chain: Sequence[x509.Certificate],
    *,
    now: datetime.datetime | None = None,
    max_chain_length: int = DEFAULT_MAX_CHAIN_LENGTH,
) -> NodeId:
    """The wanted NodeId that ``chain`` proves, or a CertificateChainError."""
    chain = _as_chain(chain, max_chain_length)
    wanted = frozenset(node_ids)
    if not wanted:
        raise CertChainNoNodeIds("no NodeIds to verify the chain against")
    if not all(isinstance(node_id, NodeId) for node_id in wanted):
        raise TypeError("node_ids must be NodeId instances")
    moment = _moment(now)
    for index, certificate in enumerate(chain):
        node_id = _check_certificate(index, certificate, moment)
        if node_id in wanted:
            _check_links(chain[: index + 1])
            return node_id
    raise CertChainUnclaimed(
        f"no certificate among {len(chain)} claims any of the {len(wanted)} wanted NodeIds"
    )


def verify_client_certificate_chain(
    chain: Sequence[x509.Certificate],
    *,
    now: datetime.datetime | None = None,
    max_chain_length: int = DEFAULT_MAX_CHAIN_LENGTH,
) -> NodeId:
    """The leaf's NodeId once the whole chain checks out, or a CertificateChainError."""
    chain = _as_chain(chain, max_chain_length)
    moment = _moment(now)
    node_ids = [_check_certificate(index, c, moment) for index, c in enumerate(chain)]
    _check_links(chain)
    return node_ids[0]


def _as_chain(chain: Sequence[x509.Certificate], max_chain_length: int) -> list[x509.Certificate]:
    if not isinstance(max_chain_length, int) or isinstance(max_chain_length, bool) or max_chain_length < 1:
        raise ValueError(f"max_chain_length must be a positive integer, not {max_chain_length!r}")
    certificates = list(chain)
    if not certificates:
        raise CertChainEmpty("the peer presented no certificate")
    if len(certificates) > max_chain_length:
        raise CertChainTooLong(
            f"the peer presented {len(certificates)} certificates; at most {max_chain_length} are accepted"
        )
    if not all(isinstance(certificate, x509.Certificate) for certificate in certificates):
        raise TypeError("chain must hold cryptography x509.Certificate objects")
    return certificates


def _moment(now: datetime.datetime | None) -> datetime.datetime:
    moment = now or datetime.datetime.now(datetime.UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    # Certificates have second resolution (UTCTime); compare like the original.
    return moment.replace(microsecond=0)


def _check_certificate(index: int, certificate: x509.Certificate, now: datetime.datetime) -> NodeId:
    """Every per-certificate rule; returns the certificate's (proven) NodeId."""
    _check_parses(index, certificate)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise CertChainDateInvalid(
            f"certificate {index} is valid {certificate.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
            f" .. {certificate.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, not at {now:%Y-%m-%dT%H:%M:%SZ}"
        )
    node_id = _with_index(index, certificate_node_id, certificate)
    public_key = _ed25519_key(index, certificate)
    if NodeId.from_public_key(public_key) != node_id:
        raise CertChainKeyInvalid(
            f"certificate {index} claims {node_id} in its CN but holds another key"
        )
    _with_index(index, verify_node_signature, certificate, public_key)
    issuer_node_id = _with_index(index, certificate_issuer_node_id, certificate)
    try:
        issuer_key = issuer_node_id.public_key()
    except NodeIdInvalid as error:
        raise CertChainNameInvalid(f"certificate {index}: issuer CN is not a public key") from error
    if certificate.signature_algorithm_oid != SignatureAlgorithmOID.ED25519:
        raise CertChainSignatureInvalid(f"certificate {index} is not signed with Ed25519")
    _with_index(index, verify_signed_by, certificate, issuer_key)
    return node_id


# What cryptography raises while lazily parsing a field of a hostile certificate.
_PARSE_ERRORS = (
    ValueError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UnsupportedAlgorithm,
)


def _check_parses(index: int, certificate: x509.Certificate) -> None:
    """Parse every field up front, so later checks meet only well-formed values."""
    try:
        _ = (
            certificate.version,
            certificate.serial_number,
            certificate.signature_algorithm_oid,
            certificate.issuer,
            certificate.subject,
            certificate.not_valid_before_utc,
            certificate.not_valid_after_utc,
            list(certificate.extensions),
        )
    except _PARSE_ERRORS as error:
        raise CertChainMalformed(f"certificate {index} cannot be parsed: {error}") from error


def _ed25519_key(index: int, certificate: x509.Certificate) -> Ed25519PublicKey:
    try:
        public_key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as error:
        raise CertChainKeyInvalid(f"certificate {index} has an unreadable key") from error
    if not isinstance(public_key, Ed25519PublicKey):
        raise CertChainKeyInvalid(
            f"certificate {index} holds a {type(public_key).__name__}, not an Ed25519 key"
        )
    return public_key


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _with_index(index: int, check: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
    """Run a certificates.py check, naming the certificate's index in its error."""
    try:
        return check(*args, **kwargs)
    except (CertChainNameInvalid, CertChainSignatureInvalid) as error:
        raise type(error)(f"certificate {index}: {error}") from error


def _check_links(chain: Sequence[x509.Certificate]) -> None:
    """chain[i] is issued by (names) and signed by chain[i+1], for each neighbour pair."""
    for index in range(len(chain) - 1):
        child, parent = chain[index], chain[index + 1]
        if _name_attributes(child.issuer) != _name_attributes(parent.subject):
            raise CertChainBrokenLink(f"certificate {index} is not issued by certificate {index + 1}")
        parent_key = parent.public_key()  # already checked to be Ed25519
        if not isinstance(parent_key, Ed25519PublicKey):
            raise CertChainKeyInvalid(f"certificate {index + 1} does not hold an Ed25519 key")
        try:
            parent_key.verify(child.signature, child.tbs_certificate_bytes)
        except InvalidSignature as error:
            raise CertChainBrokenLink(
                f"certificate {index} is not signed by certificate {index + 1}"
            ) from error


def _name_attributes(name: x509.Name) -> Counter[tuple[str, str | bytes]]:
    # The original compares names attribute by attribute regardless of order.
    return Counter((attribute.oid.dotted_string, attribute.value) for attribute in name)
