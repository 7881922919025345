"""NodeId: strict multibase base32hex text form."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import NodeIdInvalid
from proxy.identity.keys import generate_key_pair
from proxy.identity.node_id import NodeId

BASE32HEX_LOWER = "0123456789abcdefghijklmnopqrstuv"


@given(st.binary(min_size=32, max_size=32))
def test_text_round_trip(raw: bytes) -> None:
    node_id = NodeId(raw)
    text = node_id.encode()
    assert len(text) == 53
    assert text[0] == "v"
    assert set(text[1:]) <= set(BASE32HEX_LOWER)
    assert "=" not in text
    assert NodeId.decode(text) == node_id
    assert bytes(NodeId.decode(text)) == raw
    assert str(node_id) == text


@settings(max_examples=500)
@given(st.text(max_size=80))
def test_random_strings_never_decode_to_a_wrong_id(text: str) -> None:
    try:
        node_id = NodeId.decode(text)
    except NodeIdInvalid:
        return
    # Whatever decodes is the canonical encoding of exactly that id.
    assert node_id.encode() == text


@settings(max_examples=500)
@given(st.text(alphabet=BASE32HEX_LOWER + "VWXYZ=", min_size=52, max_size=52))
def test_near_miss_strings_never_decode_to_a_wrong_id(body: str) -> None:
    # Right length and prefix: the interesting cases (padding bits, upper case, '=').
    text = "v" + body
    try:
        node_id = NodeId.decode(text)
    except NodeIdInvalid:
        return
    assert node_id.encode() == text


def test_known_encoding_from_the_original() -> None:
    # A NodeId printed by polykey 1.15.1's encodeNodeId (tests/node, by hand once).
    raw = bytes(
        [203, 41, 166, 18, 219, 63, 186, 224, 100, 71, 190, 47, 67, 93, 201, 4,
         144, 199, 232, 110, 154, 16, 252, 252, 233, 2, 3, 208, 0, 95, 137, 233]
    )
    text = "vpckqc4mr7ute0p27nonk6ne90i8cfq3ej88fpv79081t002vh7kg"
    assert NodeId(raw).encode() == text
    assert bytes(NodeId.decode(text)) == raw


@pytest.mark.parametrize(
    "text",
    [
        "",
        "v",
        "z" + "0" * 52,  # another multibase
        "V" + "0" * 52,  # upper-case prefix is a different multibase (base32hexupper)
        "v" + "0" * 51,  # 31.875 bytes
        "v" + "0" * 53,
        "v" + "0" * 56,  # 35 bytes
        "v" + "0" * 51 + "1",  # non-zero padding bits
        "v" + "A" * 52,  # upper case body
        "v" + "w" * 52,  # outside base32hex
        "v" + "0" * 50 + "==",
        "v" + "0" * 51 + "\u0660",  # a non-ASCII digit
    ],
)
def test_malformed_text_is_rejected(text: str) -> None:
    with pytest.raises(NodeIdInvalid):
        NodeId.decode(text)


@pytest.mark.parametrize("size", [0, 1, 16, 31, 33, 64])
def test_wrong_byte_length_is_rejected(size: int) -> None:
    with pytest.raises(NodeIdInvalid):
        NodeId(b"\x01" * size)


def test_non_str_is_rejected() -> None:
    with pytest.raises(NodeIdInvalid):
        NodeId.decode(b"v" + b"0" * 52)  # type: ignore[arg-type]


def test_from_public_key_is_the_raw_key_and_converts_back() -> None:
    key = generate_key_pair()
    node_id = NodeId.from_public_key(key.public_key())
    assert node_id.public_key() == key.public_key()
    assert len(bytes(node_id)) == 32


def test_immutable_hashable_picklable() -> None:
    node_id = NodeId(b"\x07" * 32)
    assert {node_id: 1}[NodeId(b"\x07" * 32)] == 1
    assert node_id != NodeId(b"\x08" * 32)
    assert node_id != bytes(node_id)
    with pytest.raises(AttributeError):
        node_id._bytes = b"\x00" * 32  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(node_id)) == node_id
    assert repr(node_id) == f"NodeId({node_id.encode()!r})"
