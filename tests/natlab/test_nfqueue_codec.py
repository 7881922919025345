"""The delay daemon's netlink parsing: round trip of its own encoding, and junk never raises."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from tests.natlab.nfqueue_delay import (
    NFGEN_HEADER,
    NFNL_SUBSYS_QUEUE,
    NFQA_VERDICT_HDR,
    NFQNL_MSG_VERDICT,
    _attribute,
    _message,
    parse_attributes,
    parse_messages,
)


def test_message_round_trip() -> None:
    attrs = _attribute(NFQA_VERDICT_HDR, struct.pack("!II", 1, 42)) + _attribute(9, b"abc")
    data = _message(NFQNL_MSG_VERDICT, 7, attrs, seq=5, flags=0) * 2
    messages = parse_messages(data)
    assert [kind for kind, _ in messages] == [(NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT] * 2
    payload = messages[0][1]
    assert NFGEN_HEADER.unpack_from(payload) == (0, 0, 7)
    parsed = parse_attributes(payload[NFGEN_HEADER.size:])
    assert parsed == {NFQA_VERDICT_HDR: struct.pack("!II", 1, 42), 9: b"abc"}


@given(st.binary(max_size=200))
def test_junk_never_raises(data: bytes) -> None:
    for _, payload in parse_messages(data):
        parse_attributes(payload)
    parse_attributes(data)
