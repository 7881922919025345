"""Certificate structure, field by field, down to the DER facts of the original."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from proxy.errors import CertChainNameInvalid, CertChainSignatureInvalid, KeyFileError
from proxy.identity.certificates import (
    NODE_SIGNATURE_EXTENSION_OID,
    VERSION_EXTENSION_OID,
    certificate_issuer_node_id,
    certificate_node_id,
    certificate_node_signature,
    chain_from_pem,
    chain_to_pem,
    generate_certificate,
    renew_certificate,
    rotate_key,
    tbs_without_node_signature,
    verify_node_signature,
    verify_signed_by,
)
from proxy.identity.keys import generate_key_pair
from proxy.identity.node_id import NodeId

UTC = datetime.UTC


def raw_public_key(key) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_fields_of_a_self_signed_certificate() -> None:
    key = generate_key_pair()
    node_id = NodeId.from_public_key(key.public_key())
    start = datetime.datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
    certificate = generate_certificate(key, duration=3600, not_before=start)

    assert certificate.version == x509.Version.v3
    assert certificate.signature_algorithm_oid == x509.oid.SignatureAlgorithmOID.ED25519
    assert certificate.not_valid_before_utc == start.replace(microsecond=0)
    assert certificate.not_valid_after_utc == start.replace(microsecond=0) + datetime.timedelta(hours=1)
    assert certificate_node_id(certificate) == node_id
    assert certificate_issuer_node_id(certificate) == node_id
    assert certificate.public_key() == key.public_key()

    extensions = list(certificate.extensions)
    assert [extension.oid for extension in extensions] == [
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        VERSION_EXTENSION_OID,
        NODE_SIGNATURE_EXTENSION_OID,
    ]
    assert not any(extension.critical for extension in extensions)
    basic = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is True and basic.path_length is None
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.content_commitment and usage.key_encipherment
    assert usage.data_encipherment and usage.key_agreement and usage.key_cert_sign and usage.crl_sign
    assert list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.CODE_SIGNING,
        ExtendedKeyUsageOID.EMAIL_PROTECTION,
        ExtendedKeyUsageOID.TIME_STAMPING,
        ExtendedKeyUsageOID.OCSP_SIGNING,
    ]
    names = list(certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    assert names == [
        x509.DNSName(node_id.encode()),
        x509.UniformResourceIdentifier(f"pk://{node_id.encode()}"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    key_identifier = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert key_identifier.digest == hashlib.sha1(raw_public_key(key)).digest()


def test_der_level_facts() -> None:
    subject, issuer = generate_key_pair(), generate_key_pair()
    certificate = generate_certificate(subject, issuer)
    der = certificate.public_bytes(Encoding.DER)
    tbs = certificate.tbs_certificate_bytes

    # Strict DER: the strict parser reads it back to the same bytes.
    assert x509.load_der_x509_certificate(der).public_bytes(Encoding.DER) == der
    # TBS: SEQUENCE (long length), [0] { INTEGER 2 }, INTEGER of exactly 16 bytes.
    assert tbs[0] == 0x30 and tbs[1] == 0x82
    assert tbs[4:9] == bytes.fromhex("a003020102")
    assert tbs[9:11] == bytes([0x02, 16])
    assert 0 < tbs[11] < 0x80  # no sign padding needed, no leading zero
    assert int.from_bytes(tbs[11:27], "big") == certificate.serial_number

    # CN as a PrintableString (tag 0x13) of the 53-character encoded NodeId.
    for name, key in ((certificate.subject, subject), (certificate.issuer, issuer)):
        encoded = NodeId.from_public_key(key.public_key()).encode().encode()
        assert len(encoded) == 53
        assert name.public_bytes() == (
            bytes([0x30, 64, 0x31, 62, 0x30, 60, 0x06, 0x03]) + bytes.fromhex("550403")
            + bytes([0x13, 53]) + encoded
        )
        attribute = name.get_attributes_for_oid(NameOID.COMMON_NAME)[0]
        assert attribute._type == x509.name._ASN1Type.PrintableString

    version = certificate.extensions.get_extension_for_oid(VERSION_EXTENSION_OID).value.value
    assert version[0] == 0x16 and version[1] == len(version) - 2  # IA5String
    assert version[2:].isascii()

    node_signature_extension = list(certificate.extensions)[-1]
    assert node_signature_extension.oid == NODE_SIGNATURE_EXTENSION_OID
    value = node_signature_extension.value.value
    assert value[:2] == bytes([0x04, 64]) and len(value) == 66  # DER OCTET STRING, 64 bytes
    assert certificate_node_signature(certificate) == value[2:]


def test_node_signature_is_over_the_tbs_without_that_extension() -> None:
    subject, issuer = generate_key_pair(), generate_key_pair()
    certificate = generate_certificate(subject, issuer)
    message = tbs_without_node_signature(certificate.tbs_certificate_bytes)
    # The subject key signed exactly this; the issuer key signed the full TBS.
    subject.public_key().verify(certificate_node_signature(certificate), message)
    issuer.public_key().verify(certificate.signature, certificate.tbs_certificate_bytes)
    verify_node_signature(certificate, subject.public_key())
    verify_signed_by(certificate, issuer.public_key())
    with pytest.raises(CertChainSignatureInvalid):
        verify_signed_by(certificate, subject.public_key())
    with pytest.raises(CertChainSignatureInvalid):
        verify_node_signature(certificate, issuer.public_key())
    # The node-signature extension is the TBS's last element; removing it leaves
    # everything before the extensions header byte for byte the same.
    full = certificate.tbs_certificate_bytes
    extension_tlv = (
        bytes([0x30, 0x51]) + bytes.fromhex("060b2b0601040183be4f020202")  # 1.3.6.1.4.1.57167.2.2.2
        + bytes([0x04, 0x42, 0x04, 0x40]) + certificate_node_signature(certificate)
    )
    assert full.endswith(extension_tlv)
    assert len(full) - len(message) == len(extension_tlv) == 83
    extensions_at = full.index(bytes([0xA3, 0x82]))
    assert message[4:extensions_at] == full[4:extensions_at]
    assert message[extensions_at + 8 :] == full[extensions_at + 8 : -83]


def test_tbs_walker_rejects_non_der() -> None:
    with pytest.raises(ValueError):
        tbs_without_node_signature(b"")
    with pytest.raises(ValueError):
        tbs_without_node_signature(bytes.fromhex("3080"))  # indefinite length
    with pytest.raises(ValueError):
        tbs_without_node_signature(bytes.fromhex("308100"))  # non-minimal length
    with pytest.raises(ValueError):
        tbs_without_node_signature(bytes.fromhex("3005020100"))  # overrun
    assert tbs_without_node_signature(bytes.fromhex("3003020100")) == bytes.fromhex("3003020100")


def test_duration_and_bounds() -> None:
    key = generate_key_pair()
    start = datetime.datetime(2030, 6, 1, tzinfo=UTC)
    zero = generate_certificate(key, duration=0, not_before=start)
    assert zero.not_valid_before_utc == zero.not_valid_after_utc == start
    with pytest.raises(ValueError):
        generate_certificate(key, duration=-1)
    with pytest.raises(ValueError):
        generate_certificate(key, duration=1, not_before=datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC))
    latest = generate_certificate(key, duration=0, not_before=datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC))
    assert latest.not_valid_after_utc.year == 2049
    naive = generate_certificate(key, duration=10, not_before=datetime.datetime(2031, 1, 1))
    assert naive.not_valid_before_utc == datetime.datetime(2031, 1, 1, tzinfo=UTC)


def test_serial_numbers_are_16_bytes_and_distinct() -> None:
    key = generate_key_pair()
    serials = [generate_certificate(key).serial_number for _ in range(20)]
    assert len(set(serials)) == 20
    assert all(120 < serial.bit_length() <= 127 for serial in serials)


def test_renew_keeps_the_key_and_links() -> None:
    key = generate_key_pair()
    first = generate_certificate(key, duration=100)
    chain = renew_certificate(key, [first], duration=200)
    assert len(chain) == 2 and chain[1] is first
    assert chain[0].public_key() == key.public_key()
    assert chain[0].serial_number != first.serial_number
    assert chain[0].issuer == first.subject
    verify_signed_by(chain[0], key.public_key())


def test_rotate_issues_the_new_certificate_with_the_old_key() -> None:
    old_key = generate_key_pair()
    chain = [generate_certificate(old_key)]
    new_key, chain = rotate_key(old_key, chain)
    newer_key, chain = rotate_key(new_key, chain)
    assert len(chain) == 3
    assert [certificate_node_id(c) for c in chain] == [
        NodeId.from_public_key(k.public_key()) for k in (newer_key, new_key, old_key)
    ]
    for child, parent, parent_key in ((chain[0], chain[1], new_key), (chain[1], chain[2], old_key)):
        assert child.issuer == parent.subject
        verify_signed_by(child, parent_key.public_key())
    with pytest.raises(ValueError):
        rotate_key(old_key, chain)  # chain[0] is not old_key's


def test_expired_tail_is_dropped_on_renewal() -> None:
    key = generate_key_pair()
    old = generate_certificate(key, duration=10, not_before=datetime.datetime(2020, 1, 1, tzinfo=UTC))
    chain = renew_certificate(key, [old])
    assert len(chain) == 1


def test_pem_chain_round_trip(tmp_path: Path) -> None:
    key = generate_key_pair()
    _, chain = rotate_key(key, [generate_certificate(key)])
    pem = chain_to_pem(chain)
    assert pem.count(b"-----BEGIN CERTIFICATE-----") == 2
    assert chain_from_pem(pem) == chain
    with pytest.raises(KeyFileError):
        chain_from_pem(b"not a certificate")
    with pytest.raises(KeyFileError):
        chain_from_pem(b"")


def test_node_id_of_a_certificate_without_cn() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a node id")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2026, 1, 1))
        .not_valid_after(datetime.datetime(2027, 1, 1))
        .sign(key, None)
    )
    with pytest.raises(CertChainNameInvalid):
        certificate_node_id(certificate)
    with pytest.raises(CertChainNameInvalid):
        certificate_issuer_node_id(certificate)
    with pytest.raises(CertChainSignatureInvalid):
        certificate_node_signature(certificate)
