"""The verification matrix: good chains of every shape, each failure kind on purpose."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import (
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
    CertificateChainError,
)
from proxy.identity import verification
from proxy.identity.certificates import (
    NODE_SIGNATURE_EXTENSION_OID,
    chain_from_der,
    generate_certificate,
    renew_certificate,
    rotate_key,
)
from proxy.identity.keys import generate_key_pair
from proxy.identity.node_id import NodeId
from proxy.identity.verification import verify_client_certificate_chain, verify_server_certificate_chain

UTC = datetime.UTC


def node_id_of(key: Ed25519PrivateKey) -> NodeId:
    return NodeId.from_public_key(key.public_key())


def rotated_chain(length: int) -> tuple[list[Ed25519PrivateKey], list[x509.Certificate]]:
    """Keys and chain, both leaf first, after ``length - 1`` rotations."""
    key = generate_key_pair()
    keys, chain = [key], [generate_certificate(key)]
    for _ in range(length - 1):
        key, chain = rotate_key(key, chain)
        keys.insert(0, key)
    return keys, chain


def cn_name(text: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, text, _type=x509.name._ASN1Type.PrintableString)]
    )


def forge(
    *,
    public_key,
    subject: x509.Name,
    issuer: x509.Name,
    node_signer: Ed25519PrivateKey | None,
    outer_signer: Ed25519PrivateKey,
    node_signature: bytes | None = None,
    not_before: datetime.datetime | None = None,
    duration: datetime.timedelta = datetime.timedelta(days=1),
) -> x509.Certificate:
    """A certificate built the original's way, with every field under the test's control."""
    start = (not_before or datetime.datetime.now(UTC)).replace(microsecond=0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + duration)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=False)
    )
    if node_signer is not None:
        signature = node_signature or builder.sign(node_signer, None).signature
        builder = builder.add_extension(
            x509.UnrecognizedExtension(NODE_SIGNATURE_EXTENSION_OID, bytes([0x04, 64]) + signature),
            critical=False,
        )
    return builder.sign(outer_signer, None)


# --- good chains -------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 3, 4])
def test_wanted_node_id_at_every_index(length: int) -> None:
    keys, chain = rotated_chain(length)
    for key in keys:
        assert verify_server_certificate_chain([node_id_of(key)], chain) == node_id_of(key)
        # Among other wanted ids (not in the chain), the claimed one is returned.
        others = [node_id_of(generate_key_pair()) for _ in range(3)]
        assert verify_server_certificate_chain([*others, node_id_of(key)], chain) == node_id_of(key)
    assert verify_client_certificate_chain(chain) == node_id_of(keys[0])


def test_several_wanted_ids_in_the_chain_give_the_one_nearest_the_leaf() -> None:
    keys, chain = rotated_chain(3)
    wanted = {node_id_of(keys[2]), node_id_of(keys[1])}
    assert verify_server_certificate_chain(wanted, chain) == node_id_of(keys[1])


def test_a_leaf_issued_by_an_absent_old_key_verifies_alone() -> None:
    # The outer signature is checked under the key the issuer CN names.
    keys, chain = rotated_chain(2)
    assert verify_server_certificate_chain([node_id_of(keys[0])], chain[:1]) == node_id_of(keys[0])
    assert verify_client_certificate_chain(chain[:1]) == node_id_of(keys[0])


def test_renewed_chain_with_the_same_key() -> None:
    key = generate_key_pair()
    chain = renew_certificate(key, [generate_certificate(key)])
    chain = renew_certificate(key, chain)
    assert len(chain) == 3
    assert verify_server_certificate_chain([node_id_of(key)], chain) == node_id_of(key)
    assert verify_client_certificate_chain(chain) == node_id_of(key)


def test_validity_bounds_are_inclusive_at_second_resolution() -> None:
    key = generate_key_pair()
    start = datetime.datetime(2030, 1, 1, tzinfo=UTC)
    chain = [generate_certificate(key, duration=60, not_before=start)]
    wanted = [node_id_of(key)]
    for moment in (start, start + datetime.timedelta(seconds=60, microseconds=999_999)):
        assert verify_server_certificate_chain(wanted, chain, now=moment) == wanted[0]
    for moment in (start - datetime.timedelta(seconds=1), start + datetime.timedelta(seconds=61)):
        with pytest.raises(CertChainDateInvalid):
            verify_server_certificate_chain(wanted, chain, now=moment)
        with pytest.raises(CertChainDateInvalid):
            verify_client_certificate_chain(chain, now=moment)


# --- each failure on purpose ----------------------------------------------------------


def test_empty_chain() -> None:
    with pytest.raises(CertChainEmpty):
        verify_server_certificate_chain([node_id_of(generate_key_pair())], [])
    with pytest.raises(CertChainEmpty):
        verify_client_certificate_chain([])


def test_no_node_ids() -> None:
    _, chain = rotated_chain(1)
    with pytest.raises(CertChainNoNodeIds):
        verify_server_certificate_chain([], chain)


@pytest.mark.parametrize("length", [1, 3])
def test_unclaimed(length: int) -> None:
    _, chain = rotated_chain(length)
    with pytest.raises(CertChainUnclaimed):
        verify_server_certificate_chain([node_id_of(generate_key_pair())], chain)


def test_expired_and_not_yet_valid() -> None:
    key = generate_key_pair()
    expired = generate_certificate(key, duration=60, not_before=datetime.datetime(2020, 1, 1, tzinfo=UTC))
    future = generate_certificate(key, duration=60, not_before=datetime.datetime.now(UTC) + datetime.timedelta(hours=1))
    for certificate in (expired, future):
        with pytest.raises(CertChainDateInvalid):
            verify_server_certificate_chain([node_id_of(key)], [certificate])
        with pytest.raises(CertChainDateInvalid):
            verify_client_certificate_chain([certificate])


def test_expired_certificate_inside_a_chain() -> None:
    old_key = generate_key_pair()
    half_an_hour_ago = datetime.datetime.now(UTC) - datetime.timedelta(minutes=30)
    old = generate_certificate(old_key, duration=3600, not_before=half_an_hour_ago)
    new_key, chain = rotate_key(old_key, [old])
    later = datetime.datetime.now(UTC) + datetime.timedelta(hours=2)  # old expired, new not
    # Server side stops at the claiming leaf; the old certificate is never examined.
    assert verify_server_certificate_chain([node_id_of(new_key)], chain, now=later) == node_id_of(new_key)
    with pytest.raises(CertChainDateInvalid):
        verify_server_certificate_chain([node_id_of(old_key)], chain, now=later)
    with pytest.raises(CertChainDateInvalid):
        verify_client_certificate_chain(chain, now=later)


def test_missing_cn() -> None:
    key = generate_key_pair()
    nameless = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no cn here")])
    certificate = forge(
        public_key=key.public_key(), subject=nameless, issuer=cn_name(node_id_of(key).encode()),
        node_signer=key, outer_signer=key,
    )
    with pytest.raises(CertChainNameInvalid):
        verify_server_certificate_chain([node_id_of(key)], [certificate])
    with pytest.raises(CertChainNameInvalid):
        verify_client_certificate_chain([certificate])


@pytest.mark.parametrize(
    "cn", ["not a node id", "v" + "0" * 51 + "1", "z6Mk" + "a" * 44, "V" + "0" * 52]
)
def test_cn_that_is_not_an_encoded_node_id(cn: str) -> None:
    key = generate_key_pair()
    certificate = forge(
        public_key=key.public_key(), subject=cn_name(cn), issuer=cn_name(node_id_of(key).encode()),
        node_signer=key, outer_signer=key,
    )
    with pytest.raises(CertChainNameInvalid):
        verify_client_certificate_chain([certificate])


def test_issuer_cn_missing() -> None:
    key = generate_key_pair()
    certificate = forge(
        public_key=key.public_key(), subject=cn_name(node_id_of(key).encode()),
        issuer=x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]),
        node_signer=key, outer_signer=key,
    )
    with pytest.raises(CertChainNameInvalid):
        verify_client_certificate_chain([certificate])


def test_tampered_node_signature() -> None:
    key = generate_key_pair()
    good = generate_certificate(key)
    signature = bytearray(good.extensions.get_extension_for_oid(NODE_SIGNATURE_EXTENSION_OID).value.value[2:])
    signature[10] ^= 0x01
    certificate = forge(
        public_key=key.public_key(), subject=good.subject, issuer=good.issuer,
        node_signer=key, outer_signer=key, node_signature=bytes(signature),
    )
    with pytest.raises(CertChainSignatureInvalid, match="node signature"):
        verify_server_certificate_chain([node_id_of(key)], [certificate])
    with pytest.raises(CertChainSignatureInvalid):
        verify_client_certificate_chain([certificate])


def test_missing_node_signature() -> None:
    key = generate_key_pair()
    certificate = forge(
        public_key=key.public_key(), subject=cn_name(node_id_of(key).encode()),
        issuer=cn_name(node_id_of(key).encode()), node_signer=None, outer_signer=key,
    )
    with pytest.raises(CertChainSignatureInvalid):
        verify_client_certificate_chain([certificate])


def test_node_signature_by_another_key() -> None:
    key, other = generate_key_pair(), generate_key_pair()
    certificate = forge(
        public_key=key.public_key(), subject=cn_name(node_id_of(key).encode()),
        issuer=cn_name(node_id_of(key).encode()), node_signer=other, outer_signer=key,
    )
    with pytest.raises(CertChainSignatureInvalid):
        verify_server_certificate_chain([node_id_of(key)], [certificate])


def test_claiming_certificate_with_a_bad_outer_signature() -> None:
    # Closed hole 2: the original never checks the claiming certificate's own signature.
    key, other = generate_key_pair(), generate_key_pair()
    certificate = forge(
        public_key=key.public_key(), subject=cn_name(node_id_of(key).encode()),
        issuer=cn_name(node_id_of(key).encode()), node_signer=key, outer_signer=other,
    )
    with pytest.raises(CertChainSignatureInvalid, match="certificate signature"):
        verify_server_certificate_chain([node_id_of(key)], [certificate])
    with pytest.raises(CertChainSignatureInvalid):
        verify_client_certificate_chain([certificate])


def test_forged_cn_naming_another_node() -> None:
    # Closed hole 1: a self-consistent certificate whose CN names the victim.
    victim, attacker = generate_key_pair(), generate_key_pair()
    for issuer in (victim, attacker):
        certificate = forge(
            public_key=attacker.public_key(), subject=cn_name(node_id_of(victim).encode()),
            issuer=cn_name(node_id_of(issuer).encode()), node_signer=attacker, outer_signer=attacker,
        )
        with pytest.raises(CertChainKeyInvalid):
            verify_server_certificate_chain([node_id_of(victim)], [certificate])
        with pytest.raises(CertChainKeyInvalid):
            verify_client_certificate_chain([certificate])


def test_forged_cn_at_the_top_of_a_real_chain() -> None:
    # The attacker's real leaf, then a forged certificate claiming the victim.
    victim, attacker = generate_key_pair(), generate_key_pair()
    forged_top = forge(
        public_key=attacker.public_key(), subject=cn_name(node_id_of(victim).encode()),
        issuer=cn_name(node_id_of(victim).encode()), node_signer=attacker, outer_signer=attacker,
    )
    leaf = forge(
        public_key=attacker.public_key(), subject=cn_name(node_id_of(attacker).encode()),
        issuer=cn_name(node_id_of(victim).encode()), node_signer=attacker, outer_signer=attacker,
    )
    with pytest.raises(CertChainSignatureInvalid):
        verify_server_certificate_chain([node_id_of(victim)], [leaf, forged_top])


def test_non_ed25519_key() -> None:
    issuer = generate_key_pair()
    ec_key = ec.generate_private_key(ec.SECP256R1())
    certificate = forge(
        public_key=ec_key.public_key(), subject=cn_name(node_id_of(issuer).encode()),
        issuer=cn_name(node_id_of(issuer).encode()), node_signer=issuer, outer_signer=issuer,
    )
    with pytest.raises(CertChainKeyInvalid):
        verify_server_certificate_chain([node_id_of(issuer)], [certificate])
    with pytest.raises(CertChainKeyInvalid):
        verify_client_certificate_chain([certificate])


def test_swapped_link() -> None:
    keys, chain = rotated_chain(3)
    swapped = [chain[0], chain[2], chain[1]]
    with pytest.raises(CertChainBrokenLink):
        verify_server_certificate_chain([node_id_of(keys[1])], swapped)
    with pytest.raises(CertChainBrokenLink):
        verify_client_certificate_chain(swapped)
    # The leaf alone still claims its own id: nothing above it is looked at.
    assert verify_server_certificate_chain([node_id_of(keys[0])], swapped) == node_id_of(keys[0])


def test_wrong_issuer() -> None:
    keys, chain = rotated_chain(2)
    stranger = generate_key_pair()
    wrong = [chain[0], generate_certificate(stranger)]
    with pytest.raises(CertChainBrokenLink, match="not issued by"):
        verify_server_certificate_chain([node_id_of(stranger)], wrong)
    with pytest.raises(CertChainBrokenLink):
        verify_client_certificate_chain(wrong)


def test_named_issuer_but_signed_by_another() -> None:
    # Names link, signature does not: certificate 0 names key B as issuer, A signed it.
    a, b = generate_key_pair(), generate_key_pair()
    leaf = forge(
        public_key=a.public_key(), subject=cn_name(node_id_of(a).encode()),
        issuer=cn_name(node_id_of(b).encode()), node_signer=a, outer_signer=a,
    )
    with pytest.raises(CertChainSignatureInvalid):
        verify_client_certificate_chain([leaf, generate_certificate(b)])


def test_broken_link_beyond_the_claim_only_matters_to_the_client_side() -> None:
    keys, chain = rotated_chain(2)
    chain = [*chain, generate_certificate(generate_key_pair())]  # unrelated tail
    assert verify_server_certificate_chain([node_id_of(keys[1])], chain) == node_id_of(keys[1])
    with pytest.raises(CertChainBrokenLink):
        verify_client_certificate_chain(chain)


def test_errors_map_to_http_526_and_share_a_base() -> None:
    for error in (
        CertChainEmpty, CertChainNoNodeIds, CertChainUnclaimed, CertChainBrokenLink,
        CertChainDateInvalid, CertChainNameInvalid, CertChainKeyInvalid, CertChainSignatureInvalid,
        CertChainTooLong,
    ):
        assert issubclass(error, CertificateChainError)
        assert error.http_status == 526


def test_bad_arguments_are_programming_errors() -> None:
    _, chain = rotated_chain(1)
    with pytest.raises(TypeError):
        verify_server_certificate_chain(["v" + "0" * 52], chain)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        verify_client_certificate_chain([b"der bytes"])  # type: ignore[list-item]


# --- chain length -------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain_121() -> tuple[list[Ed25519PrivateKey], list[x509.Certificate]]:
    return rotated_chain(121)  # 120 rotations, every link real


@pytest.fixture
def signature_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every per-certificate check and link check verification starts."""
    calls: list[str] = []
    for name in ("_check_certificate", "_check_links", "verify_node_signature", "verify_signed_by"):
        real = getattr(verification, name)

        def counting(*args, _real=real, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(verification, name, counting)
    return calls


def test_a_chain_longer_than_the_limit_is_refused_before_any_signature(
    chain_121: tuple[list[Ed25519PrivateKey], list[x509.Certificate]], signature_checks: list[str]
) -> None:
    keys, chain = chain_121
    root, leaf = node_id_of(keys[-1]), node_id_of(keys[0])
    with pytest.raises(CertChainTooLong, match="121 certificates; at most 32") as info:
        verify_client_certificate_chain(chain)
    assert info.value.http_status == 526
    # The leaf alone would prove `leaf`: the length is refused all the same.
    for wanted in ([root], [leaf]):
        with pytest.raises(CertChainTooLong):
            verify_server_certificate_chain(wanted, chain)
    with pytest.raises(CertChainTooLong, match="at most 120"):
        verify_client_certificate_chain(chain, max_chain_length=120)
    assert signature_checks == []
    # The same chain is otherwise sound: with room for it, it verifies.
    assert verify_client_certificate_chain(chain, max_chain_length=121) == leaf
    assert verify_server_certificate_chain([root], chain, max_chain_length=121) == root
    assert signature_checks.count("verify_signed_by") == 2 * 121


def test_a_chain_at_the_limit_verifies(chain_121: tuple[list[Ed25519PrivateKey], list[x509.Certificate]]) -> None:
    keys, chain = chain_121
    at_limit = chain[-32:]  # the 32 oldest certificates: a chain after 31 rotations
    assert verify_client_certificate_chain(at_limit) == node_id_of(keys[-32])
    assert verify_server_certificate_chain([node_id_of(keys[-1])], at_limit) == node_id_of(keys[-1])
    with pytest.raises(CertChainTooLong):
        verify_client_certificate_chain(chain[-33:])
    assert verify_client_certificate_chain(chain[-1:], max_chain_length=1) == node_id_of(keys[-1])
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError):
            verify_client_certificate_chain(at_limit, max_chain_length=bad)  # type: ignore[arg-type]


def certificates_of(chain: Sequence[x509.Certificate]) -> list[NodeId]:
    from proxy.identity.certificates import certificate_node_id

    return [certificate_node_id(certificate) for certificate in chain]


def test_rotated_chain_helper_shape() -> None:
    keys, chain = rotated_chain(4)
    assert certificates_of(chain) == [node_id_of(key) for key in keys]


# --- hostile bytes ---------------------------------------------------------------------

_KEYS, _CHAIN = rotated_chain(2)
_DER = [certificate.public_bytes(Encoding.DER) for certificate in _CHAIN]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(min_value=0, max_value=1),
    position=st.integers(min_value=0, max_value=len(_DER[0]) - 1),
    value=st.integers(min_value=0, max_value=255),
)
def test_mutated_certificates_fail_typed_or_not_at_all(which: int, position: int, value: int) -> None:
    der = bytearray(_DER[which])
    der[position] = value
    try:
        (mutated,) = chain_from_der([bytes(der)])
    except CertChainMalformed:
        return  # the strict DER parser refused it before verification ever saw it
    chain = list(_CHAIN)
    chain[which] = mutated
    try:
        verify_client_certificate_chain(chain)
    except CertificateChainError:
        return
    # Only a change that leaves every signed byte intact may still verify.
    assert bytes(der) == _DER[which] or mutated.tbs_certificate_bytes == _CHAIN[which].tbs_certificate_bytes


def test_chain_from_der() -> None:
    assert chain_from_der(_DER) == _CHAIN
    with pytest.raises(CertChainMalformed, match="certificate 1"):
        chain_from_der([_DER[0], b"\x30\x03\x02\x01\x01"])
    with pytest.raises(CertChainMalformed):
        chain_from_der([_DER[0][:-1]])
    version_1 = bytearray(_DER[0])
    version_1[12] = 0x05  # TBS version INTEGER 5: not an X.509 version
    with pytest.raises(CertChainMalformed):
        chain_from_der([bytes(version_1)])
