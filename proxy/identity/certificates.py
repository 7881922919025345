"""Polykey-compatible X.509 certificates: generate, renew, rotate, PEM chains.

A certificate names its subject and issuer by encoded NodeId (CN, a PrintableString)
and carries a *node signature*: the subject key's Ed25519 signature over the DER
TBSCertificate without the node-signature extension, itself the last extension.
The issuer key then signs the whole certificate. Because Ed25519 signs the TBS bytes
directly, building the certificate once signed by the subject key yields exactly
that node signature; the second build adds the extension and is signed by the
issuer (the original does the same).

Chains are leaf first: after a key rotation chain[i] is issued and signed by
chain[i+1].
"""

from __future__ import annotations

import datetime
import importlib.metadata
import ipaddress
import os
import time
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.identity.errors import (
    CertChainMalformed,
    CertChainNameInvalid,
    CertChainSignatureInvalid,
    KeyFileError,
)
from proxy.identity.node_id import NodeId

VERSION_EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.57167.2.2.1")
NODE_SIGNATURE_EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.57167.2.2.2")

DEFAULT_DURATION = datetime.timedelta(seconds=31_536_000)  # the original's certDuration
SERIAL_NUMBER_SIZE = 16
NODE_SIGNATURE_SIZE = 64

# UTCTime bounds, as the original enforces: second resolution, 1970..2049.
_EARLIEST = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_LATEST = datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)

_EXTENDED_KEY_USAGES = (
    ExtendedKeyUsageOID.SERVER_AUTH,
    ExtendedKeyUsageOID.CLIENT_AUTH,
    ExtendedKeyUsageOID.CODE_SIGNING,
    ExtendedKeyUsageOID.EMAIL_PROTECTION,
    ExtendedKeyUsageOID.TIME_STAMPING,
    ExtendedKeyUsageOID.OCSP_SIGNING,
)

try:
    KEYNODE_VERSION = importlib.metadata.version("keynode")
except importlib.metadata.PackageNotFoundError:  # running from a bare checkout
    KEYNODE_VERSION = "0.0.0"


# --- a minimal strict DER walker: just enough to splice one extension out ----------

_TAG_SEQUENCE = 0x30
_TAG_OCTET_STRING = 0x04
_TAG_OID = 0x06
_TAG_IA5_STRING = 0x16
_TAG_EXTENSIONS = 0xA3  # [3] EXPLICIT, constructed


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


def _read_tlv(data: bytes, offset: int, end: int) -> tuple[int, int, int]:
    """(tag, content_start, content_end) of the DER element at ``offset``.

    Rejects what DER forbids (indefinite or non-minimal lengths) and multi-byte tags,
    which a TBSCertificate never needs at the levels walked here.
    """
    if offset + 2 > end:
        raise ValueError("truncated DER element")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tags are not expected here")
    first = data[offset + 1]
    position = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or position + count > end:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[position : position + count], "big")
        if length < 0x80 or data[position] == 0:
            raise ValueError("non-minimal DER length")
        position += count
    if position + length > end:
        raise ValueError("DER element overruns its parent")
    return tag, position, position + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, element_start, content_start, content_end) of each child in data[start:end]."""
    children = []
    offset = start
    while offset < end:
        tag, content_start, content_end = _read_tlv(data, offset, end)
        children.append((tag, offset, content_start, content_end))
        offset = content_end
    return children


def _der_oid(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(arc) for arc in oid.dotted_string.split(".")]
    content = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        groups = [arc & 0x7F]
        arc >>= 7
        while arc:
            groups.append(0x80 | (arc & 0x7F))
            arc >>= 7
        content += bytes(reversed(groups))
    return _der(_TAG_OID, bytes(content))


_NODE_SIGNATURE_OID_DER = _der_oid(NODE_SIGNATURE_EXTENSION_OID)


def tbs_without_node_signature(tbs: bytes) -> bytes:
    """The DER TBSCertificate with every node-signature extension removed.

    This is exactly what the subject key signed. Raises ValueError on DER this walker
    cannot follow.
    """
    tag, start, end = _read_tlv(tbs, 0, len(tbs))
    if tag != _TAG_SEQUENCE or end != len(tbs):
        raise ValueError("a TBSCertificate is one DER SEQUENCE")
    parts: list[bytes] = []
    for child_tag, element_start, content_start, content_end in _children(tbs, start, end):
        if child_tag != _TAG_EXTENSIONS:
            parts.append(tbs[element_start:content_end])
            continue
        sequence_tag, sequence_start, sequence_end = _read_tlv(tbs, content_start, content_end)
        if sequence_tag != _TAG_SEQUENCE or sequence_end != content_end:
            raise ValueError("extensions are one DER SEQUENCE")
        kept = []
        for extension in _children(tbs, sequence_start, sequence_end):
            extension_tag, extension_start, inner_start, extension_end = extension
            if extension_tag != _TAG_SEQUENCE:
                raise ValueError("an extension is a DER SEQUENCE")
            _, _, oid_end = _read_tlv(tbs, inner_start, extension_end)
            if tbs[inner_start:oid_end] != _NODE_SIGNATURE_OID_DER:
                kept.append(tbs[extension_start:extension_end])
        parts.append(_der(_TAG_EXTENSIONS, _der(_TAG_SEQUENCE, b"".join(kept))))
    return _der(_TAG_SEQUENCE, b"".join(parts))


# --- generation ------------------------------------------------------------------


def _node_id_name(node_id: NodeId) -> x509.Name:
    # The original writes CN as a PrintableString; cryptography's default is UTF8String
    # and it offers no public way to choose, hence the private _ASN1Type.
    attribute = x509.NameAttribute(
        NameOID.COMMON_NAME, node_id.encode(), _type=x509.name._ASN1Type.PrintableString
    )
    return x509.Name([attribute])


def _serial_number() -> int:
    """16 bytes, time-sortable like the original's CertId (a UUIDv7 layout).

    48 bits of Unix milliseconds keep the top byte non-zero and below 0x80, so the
    DER INTEGER is always exactly 16 bytes.
    """
    milliseconds = time.time_ns() // 1_000_000
    random_bits = int.from_bytes(os.urandom(10), "big")
    value = (milliseconds & ((1 << 48) - 1)) << 80 | random_bits
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return value


def _as_timedelta(duration: datetime.timedelta | float) -> datetime.timedelta:
    if isinstance(duration, datetime.timedelta):
        return duration
    return datetime.timedelta(seconds=duration)


def generate_certificate(
    subject_key: Ed25519PrivateKey,
    issuer_key: Ed25519PrivateKey | None = None,
    duration: datetime.timedelta | float = DEFAULT_DURATION,
    not_before: datetime.datetime | None = None,
    *,
    version: str = KEYNODE_VERSION,
    serial_number: int | None = None,
) -> x509.Certificate:
    """A certificate for ``subject_key``, issued and signed by ``issuer_key``.

    ``issuer_key`` None means self-signed. ``duration`` (seconds or timedelta) counts
    from ``not_before`` (default: now); both are truncated to whole seconds.
    ``serial_number`` (default: a fresh time-sortable one) must fit in 16 bytes.
    """
    if not isinstance(subject_key, Ed25519PrivateKey):
        raise TypeError("subject_key must be an Ed25519 private key")
    if issuer_key is None:
        issuer_key = subject_key
    if not isinstance(issuer_key, Ed25519PrivateKey):
        raise TypeError("issuer_key must be an Ed25519 private key")
    validity = _as_timedelta(duration)
    if validity < datetime.timedelta(0):
        raise ValueError("duration must not be negative")
    start = not_before or datetime.datetime.now(datetime.UTC)
    if start.tzinfo is None:
        start = start.replace(tzinfo=datetime.UTC)
    start = start.replace(microsecond=0)
    end = start + validity
    end = end.replace(microsecond=0)
    if start < _EARLIEST or end > _LATEST:
        raise ValueError("validity must lie within 1970-01-01 .. 2049-12-31T23:59:59Z")
    if serial_number is None:
        serial_number = _serial_number()
    if not 0 < serial_number < 1 << (8 * SERIAL_NUMBER_SIZE - 1):
        raise ValueError("serial_number must be positive and fit a 16-byte DER INTEGER")
    if not version.isascii():
        raise ValueError("the version string must be ASCII (an IA5String)")

    subject_public_key = subject_key.public_key()
    subject_node_id = NodeId.from_public_key(subject_public_key)
    issuer_node_id = NodeId.from_public_key(issuer_key.public_key())
    encoded = subject_node_id.encode()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_node_id_name(subject_node_id))
        .issuer_name(_node_id_name(issuer_node_id))
        .public_key(subject_public_key)
        .serial_number(serial_number)
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage(list(_EXTENDED_KEY_USAGES)), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(encoded),
                    x509.UniformResourceIdentifier(f"pk://{encoded}"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_public_key), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(
                VERSION_EXTENSION_OID, _der(_TAG_IA5_STRING, version.encode("ascii"))
            ),
            critical=False,
        )
    )
    # Signed by the subject: its signature over this TBS is the node signature.
    node_signature = builder.sign(subject_key, None).signature
    builder = builder.add_extension(
        x509.UnrecognizedExtension(
            NODE_SIGNATURE_EXTENSION_OID, _der(_TAG_OCTET_STRING, node_signature)
        ),
        critical=False,
    )
    return builder.sign(issuer_key, None)


def _prune_expired(
    chain: Sequence[x509.Certificate], now: datetime.datetime
) -> list[x509.Certificate]:
    """The chain up to (not including) its first certificate expired at ``now``."""
    kept = []
    for certificate in chain:
        if certificate.not_valid_after_utc < now:
            break
        kept.append(certificate)
    return kept


def renew_certificate(
    key: Ed25519PrivateKey,
    chain: Sequence[x509.Certificate],
    duration: datetime.timedelta | float = DEFAULT_DURATION,
    not_before: datetime.datetime | None = None,
) -> list[x509.Certificate]:
    """A new self-issued certificate for the same key, prepended to ``chain``.

    ``chain[0]`` must belong to ``key``. Expired certificates are dropped from the
    end of the old chain (a valid prefix stays linked).
    """
    _require_leaf_key(key, chain)
    certificate = generate_certificate(key, key, duration, not_before)
    return [certificate, *_prune_expired(chain, certificate.not_valid_before_utc)]


def rotate_key(
    old_key: Ed25519PrivateKey,
    chain: Sequence[x509.Certificate],
    duration: datetime.timedelta | float = DEFAULT_DURATION,
    not_before: datetime.datetime | None = None,
    *,
    new_key: Ed25519PrivateKey | None = None,
) -> tuple[Ed25519PrivateKey, list[x509.Certificate]]:
    """Move to a new key: its certificate is issued and signed by ``old_key``.

    Returns the new key and the chain leaf first (new certificate, then the old chain).
    """
    _require_leaf_key(old_key, chain)
    if new_key is None:
        new_key = Ed25519PrivateKey.generate()
    certificate = generate_certificate(new_key, old_key, duration, not_before)
    return new_key, [certificate, *_prune_expired(chain, certificate.not_valid_before_utc)]


def _require_leaf_key(key: Ed25519PrivateKey, chain: Sequence[x509.Certificate]) -> None:
    if not chain:
        return
    leaf_key = chain[0].public_key()
    if not isinstance(leaf_key, Ed25519PublicKey) or NodeId.from_public_key(
        leaf_key
    ) != NodeId.from_public_key(key.public_key()):
        raise ValueError("chain[0] does not belong to this key")


# --- reading -----------------------------------------------------------------------


def certificate_node_id(certificate: x509.Certificate) -> NodeId:
    """The NodeId the subject CN claims (not checked against the key here)."""
    return _name_node_id(certificate.subject, "subject")


def certificate_issuer_node_id(certificate: x509.Certificate) -> NodeId:
    return _name_node_id(certificate.issuer, "issuer")


def _name_node_id(name: x509.Name, which: str) -> NodeId:
    try:
        attributes = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as error:
        raise CertChainNameInvalid(f"{which} name is malformed") from error
    if not attributes:
        raise CertChainNameInvalid(f"{which} has no CN")
    value = attributes[0].value
    if not isinstance(value, str):
        raise CertChainNameInvalid(f"{which} CN is not a string")
    try:
        return NodeId.decode(value)
    except ValueError as error:
        raise CertChainNameInvalid(f"{which} CN is not an encoded NodeId") from error


def certificate_node_signature(certificate: x509.Certificate) -> bytes:
    """The 64-byte node signature, raising CertChainSignatureInvalid if absent/malformed."""
    try:
        extension = certificate.extensions.get_extension_for_oid(NODE_SIGNATURE_EXTENSION_OID)
    except x509.ExtensionNotFound as error:
        raise CertChainSignatureInvalid("no node-signature extension") from error
    except ValueError as error:  # duplicate or malformed extensions
        raise CertChainSignatureInvalid(f"malformed extensions: {error}") from error
    value = extension.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    prefix = bytes([_TAG_OCTET_STRING, NODE_SIGNATURE_SIZE])
    if len(raw) != len(prefix) + NODE_SIGNATURE_SIZE or not raw.startswith(prefix):
        raise CertChainSignatureInvalid("node signature is not a 64-byte DER OCTET STRING")
    return raw[len(prefix) :]


def verify_node_signature(certificate: x509.Certificate, public_key: Ed25519PublicKey) -> None:
    """Check the subject key signed this TBS (without the node-signature extension)."""
    signature = certificate_node_signature(certificate)
    try:
        message = tbs_without_node_signature(certificate.tbs_certificate_bytes)
    except ValueError as error:
        raise CertChainSignatureInvalid(f"TBS certificate not walkable: {error}") from error
    try:
        public_key.verify(signature, message)
    except InvalidSignature as error:
        raise CertChainSignatureInvalid("node signature does not verify") from error


def verify_signed_by(certificate: x509.Certificate, public_key: Ed25519PublicKey) -> None:
    """Check the certificate's own (outer) signature under ``public_key``."""
    try:
        public_key.verify(certificate.signature, certificate.tbs_certificate_bytes)
    except InvalidSignature as error:
        raise CertChainSignatureInvalid("certificate signature does not verify") from error


# --- PEM ---------------------------------------------------------------------------


def chain_to_pem(chain: Iterable[x509.Certificate]) -> bytes:
    return b"".join(certificate.public_bytes(Encoding.PEM) for certificate in chain)


def chain_from_pem(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in file order (leaf first)."""
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise KeyFileError(f"not a PEM certificate chain: {error}") from error
    return list(chain)


def chain_to_der(chain: Iterable[x509.Certificate]) -> list[bytes]:
    return [certificate.public_bytes(Encoding.DER) for certificate in chain]


def chain_from_der(certificates: Iterable[bytes]) -> list[x509.Certificate]:
    """Parse a peer's DER certificates (strict DER), raising CertChainMalformed."""
    chain = []
    for index, der in enumerate(certificates):
        try:
            chain.append(x509.load_der_x509_certificate(der))
        except (ValueError, x509.InvalidVersion) as error:
            raise CertChainMalformed(f"certificate {index} is not DER X.509: {error}") from error
    return chain
