"""Interoperability with the original: polykey 1.15.1's certificate code under Node.

tests/node/polykey_certs.js runs the original's generateCertificate, certNodeSigned,
certSignedBy, verifyServerCertificateChain, verifyClientCertificateChain and
encodeNodeId/decodeNodeId. Node or the npm packages missing is a failure, not a skip.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from cryptography.x509.oid import NameOID

from proxy.errors import CertChainDateInvalid, CertChainKeyInvalid, CertChainSignatureInvalid, NodeIdInvalid
from proxy.identity.certificates import (
    NODE_SIGNATURE_EXTENSION_OID,
    certificate_node_id,
    generate_certificate,
    rotate_key,
)
from proxy.identity.keys import generate_key_pair
from proxy.identity.node_id import NodeId
from proxy.identity.verification import verify_client_certificate_chain, verify_server_certificate_chain

pytestmark = pytest.mark.node

NODE_DIRECTORY = Path(__file__).resolve().parents[1] / "node"
SCRIPT = NODE_DIRECTORY / "polykey_certs.js"
UTC = datetime.UTC


def polykey(*requests: dict[str, Any]) -> list[dict[str, Any]]:
    """Run requests through the original's code; one Node process per call."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the Polykey interop tests need it (make deps)")
    if not (NODE_DIRECTORY / "node_modules" / "polykey" / "package.json").is_file():
        pytest.fail("tests/node/node_modules/polykey is missing: run `make` (npm install)")
    completed = subprocess.run(
        [node, str(SCRIPT)],
        input=json.dumps(list(requests)),
        capture_output=True,
        text=True,
        cwd=NODE_DIRECTORY,
        timeout=120,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},
    )
    if completed.returncode != 0:
        pytest.fail(f"polykey_certs.js failed:\n{completed.stderr[-3000:]}")
    answers = json.loads(completed.stdout)
    assert len(answers) == len(requests)
    return answers


def der_hex(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(Encoding.DER).hex()


def node_id_of(key: Ed25519PrivateKey) -> NodeId:
    return NodeId.from_public_key(key.public_key())


def private_hex(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex()


def our_rotated_chain(length: int) -> tuple[list[Ed25519PrivateKey], list[x509.Certificate]]:
    key = generate_key_pair()
    keys, chain = [key], [generate_certificate(key)]
    for _ in range(length - 1):
        key, chain = rotate_key(key, chain)
        keys.insert(0, key)
    return keys, chain


# --- NodeId text -------------------------------------------------------------------


def test_node_id_encodings_agree_both_ways() -> None:
    raws = [bytes(32), b"\xff" * 32, bytes(range(32))] + [os.urandom(32) for _ in range(40)]
    answers = polykey(*({"op": "encode_node_id", "raw": raw.hex()} for raw in raws))
    for raw, answer in zip(raws, answers):
        assert answer["text"] == NodeId(raw).encode()
        assert bytes(NodeId.decode(answer["text"])) == raw
    answers = polykey(*({"op": "decode_node_id", "text": NodeId(raw).encode()} for raw in raws))
    assert [answer["raw"] for answer in answers] == [raw.hex() for raw in raws]


def test_strings_the_original_reads_never_decode_to_another_id_here() -> None:
    base = NodeId(os.urandom(32)).encode()
    candidates = [
        base,
        base[:-1] + "1",  # non-zero padding bits
        base[:-1] + "v",
        base.upper(),  # 'V': base32hexupper in multibase
        "V" + base[1:],
        base + "0",
        base[:-1],
        "z" + base[1:],
        "",
        "v",
    ]
    answers = polykey(*({"op": "decode_node_id", "text": text} for text in candidates))
    for text, answer in zip(candidates, answers):
        try:
            ours = NodeId.decode(text)
        except NodeIdInvalid:
            continue  # stricter than the original is fine: never a different id
        assert answer["raw"] == bytes(ours).hex(), text


# --- byte-level identity -------------------------------------------------------------


def test_same_inputs_give_byte_identical_certificates() -> None:
    subject, issuer = generate_key_pair(), generate_key_pair()
    serial = int.from_bytes(bytes.fromhex("019a") + os.urandom(14), "big")
    start = datetime.datetime(2026, 11, 22, 3, 0, 0, tzinfo=UTC)
    cases = [(subject, subject, 3600), (subject, issuer, 31_536_000), (issuer, subject, 0)]
    answers = polykey(
        *(
            {
                "op": "generate_certificate",
                "subject_private": private_hex(s),
                "issuer_private": private_hex(i),
                "serial": f"{serial:032x}",
                "now": start.timestamp(),
                "duration": duration,
            }
            for s, i, duration in cases
        )
    )
    for (s, i, duration), answer in zip(cases, answers):
        ours = generate_certificate(
            s, i, duration=duration, not_before=start, version="1.15.1", serial_number=serial
        )
        theirs = bytes.fromhex(answer["cert"])
        assert len(theirs) == 718
        assert ours.public_bytes(Encoding.DER) == theirs


# --- ours checked by the original ------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 3])
def test_our_chains_verify_in_the_original(length: int) -> None:
    keys, chain = our_rotated_chain(length)
    chain_hex = [der_hex(certificate) for certificate in chain]
    requests: list[dict[str, Any]] = [{"op": "inspect", "cert": c} for c in chain_hex]
    requests += [
        {"op": "link", "child": chain_hex[index], "parent": chain_hex[index + 1]}
        for index in range(length - 1)
    ]
    requests += [
        {"op": "verify_server", "node_ids": [node_id_of(key).encode()], "chain": chain_hex}
        for key in keys
    ]
    requests.append({"op": "verify_client", "chain": chain_hex})
    answers = polykey(*requests)

    inspected, answers = answers[:length], answers[length:]
    for key, answer in zip(keys, inspected):
        assert answer["parsed"] and answer["node_signed"]
        assert answer["node_id"] == node_id_of(key).encode()
        assert answer["public_key"] == key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
        assert len(answer["serial"]) == 32  # 16 bytes, as hex
    assert inspected[-1]["self_signed"]  # the root
    links, answers = answers[: length - 1], answers[length - 1 :]
    assert all(link["issued_by"] and link["signed_by"] for link in links)
    for key, answer in zip(keys, answers[:length]):
        assert answer == {"ok": True, "node_id": node_id_of(key).encode()}
    assert answers[length] == {"ok": True}


# --- the original's checked by ours --------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 3])
def test_original_chains_verify_here(length: int) -> None:
    (generated,) = polykey({"op": "generate_chain", "length": length, "duration": 3600})
    chain = [x509.load_der_x509_certificate(bytes.fromhex(c)) for c in generated["chain"]]
    node_ids = [NodeId.decode(key["node_id"]) for key in generated["keys"]]
    for node_id, key, certificate in zip(node_ids, generated["keys"], chain):
        assert bytes(node_id).hex() == key["public_key"]
        assert certificate_node_id(certificate) == node_id
        attribute = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0]
        assert attribute._type == x509.name._ASN1Type.PrintableString
        assert list(certificate.extensions)[-1].oid == NODE_SIGNATURE_EXTENSION_OID
    for node_id in node_ids:
        assert verify_server_certificate_chain([node_id], chain) == node_id
    assert verify_client_certificate_chain(chain) == node_ids[0]
    # Our structure matches theirs extension for extension.
    ours = generate_certificate(generate_key_pair())
    assert [e.oid for e in ours.extensions] == [e.oid for e in chain[0].extensions]
    assert [e.critical for e in ours.extensions] == [e.critical for e in chain[0].extensions]


def test_original_expired_chain_is_rejected_by_both() -> None:
    long_ago = datetime.datetime(2020, 1, 1, tzinfo=UTC).timestamp()
    (generated,) = polykey({"op": "generate_chain", "length": 2, "duration": 60, "now": long_ago})
    chain = [x509.load_der_x509_certificate(bytes.fromhex(c)) for c in generated["chain"]]
    leaf_id = NodeId.decode(generated["keys"][0]["node_id"])
    with pytest.raises(CertChainDateInvalid):
        verify_server_certificate_chain([leaf_id], chain)
    with pytest.raises(CertChainDateInvalid):
        verify_client_certificate_chain(chain)
    server, client = polykey(
        {"op": "verify_server", "node_ids": [leaf_id.encode()], "chain": generated["chain"]},
        {"op": "verify_client", "chain": generated["chain"]},
    )
    assert not server["ok"] and not client["ok"]


# --- the two closed holes -------------------------------------------------------------------


def forged(subject_cn: NodeId, key: Ed25519PrivateKey, outer_signer: Ed25519PrivateKey) -> x509.Certificate:
    """The original's certificate layout, CN chosen by the forger."""
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, subject_cn.encode(), _type=x509.name._ASN1Type.PrintableString)]
    )
    start = datetime.datetime.now(UTC).replace(microsecond=0)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=False)
    )
    node_signature = builder.sign(key, None).signature  # a valid self node-signature
    builder = builder.add_extension(
        x509.UnrecognizedExtension(NODE_SIGNATURE_EXTENSION_OID, bytes([0x04, 64]) + node_signature),
        critical=False,
    )
    return builder.sign(outer_signer, None)


def test_forged_cn_is_accepted_by_the_original_and_rejected_here() -> None:
    victim, attacker = generate_key_pair(), generate_key_pair()
    certificate = forged(node_id_of(victim), attacker, attacker)
    server, client = polykey(
        {"op": "verify_server", "node_ids": [node_id_of(victim).encode()], "chain": [der_hex(certificate)]},
        {"op": "verify_client", "chain": [der_hex(certificate)]},
    )
    # The original believes the attacker is the victim.
    assert server == {"ok": True, "node_id": node_id_of(victim).encode()}
    assert client == {"ok": True}
    with pytest.raises(CertChainKeyInvalid):
        verify_server_certificate_chain([node_id_of(victim)], [certificate])
    with pytest.raises(CertChainKeyInvalid):
        verify_client_certificate_chain([certificate])


def test_bad_outer_signature_is_accepted_by_the_original_and_rejected_here() -> None:
    key, stranger = generate_key_pair(), generate_key_pair()
    certificate = forged(node_id_of(key), key, stranger)  # outer signature by the wrong key
    (server,) = polykey(
        {"op": "verify_server", "node_ids": [node_id_of(key).encode()], "chain": [der_hex(certificate)]}
    )
    assert server == {"ok": True, "node_id": node_id_of(key).encode()}
    with pytest.raises(CertChainSignatureInvalid):
        verify_server_certificate_chain([node_id_of(key)], [certificate])
