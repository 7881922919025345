"""Bodies of the rendezvous keyed messages (types 2..15; 16..31 belong to issue 14).

Every body is fixed fields then counted lists; an address is family (4 or 6) |
IP (4 or 16 bytes) | port u16. Decoding checks every length and count and raises
Malformed; nothing is read past the end and nothing is left over.

    2 PING          txid 12 | padding*
    3 PONG          txid 12 | observed address (where the ping came from)
    4 REGISTER      txid 12 | n | n LAN addresses | record length u16 | signed record
    5 REGISTERED    txid 12 | observed address | valid for (s, u16)
    6 LOOKUP        txid 12 | target NodeId 32
    7 LOOKUP_REPLY  txid 12 | target 32 | found u8 | n | n observed | m | m LAN | record len u16 | record
    8 INTRODUCTION  caller 32 | target 32 | relay 32 | caller's observed address | n | n LAN addresses |
                    nonce 16 | expires (unix ms, u64) | Ed25519 signature 64 by the relay over the rest
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from proxy.rendezvous.errors import Malformed

Address = tuple[str, int]

PING, PONG, REGISTER, REGISTERED, LOOKUP, LOOKUP_REPLY, INTRODUCTION = range(2, 9)
TXID_SIZE = 12
MAX_ADDRESSES = 8
MAX_RECORD = 1024
INTRODUCTION_CONTEXT = b"keynode introduction v1\x00"
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int) -> bytes:
        end = self.offset + size
        if end > len(self.data):
            raise Malformed("body too short")
        chunk = self.data[self.offset:end]
        self.offset = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = _U16.unpack(self.take(2))[0]
        return value

    def u64(self) -> int:
        value: int = _U64.unpack(self.take(8))[0]
        return value

    def address(self) -> Address:
        family = self.u8()
        if family == 4:
            host = socket.inet_ntop(socket.AF_INET, self.take(4))  # ipaddress costs ~10x more
        elif family == 6:
            host = str(ipaddress.IPv6Address(self.take(16)))
        else:
            raise Malformed(f"address family {family}")
        port = self.u16()
        if port == 0:
            raise Malformed("port 0")
        return host, port

    def addresses(self) -> tuple[Address, ...]:
        count = self.u8()
        if count > MAX_ADDRESSES:
            raise Malformed(f"{count} addresses")
        return tuple(self.address() for _ in range(count))

    def record(self) -> bytes:
        size = self.u16()
        if size > MAX_RECORD:
            raise Malformed("record too long")
        return self.take(size)

    def end(self) -> None:
        if self.offset != len(self.data):
            raise Malformed("trailing bytes")


def encode_address(address: Address) -> bytes:
    port = int(address[1])
    if not 0 < port < 65536:
        raise ValueError(f"port {port}")
    try:
        packed = socket.inet_pton(socket.AF_INET, address[0])  # strict: dotted quad only
    except OSError:
        return b"\x06" + ipaddress.IPv6Address(address[0]).packed + _U16.pack(port)
    return b"\x04" + packed + _U16.pack(port)


def _addresses(addresses: tuple[Address, ...]) -> bytes:
    if len(addresses) > MAX_ADDRESSES:
        raise ValueError(f"at most {MAX_ADDRESSES} addresses")
    return bytes((len(addresses),)) + b"".join(encode_address(address) for address in addresses)


def _record(record: bytes) -> bytes:
    if len(record) > MAX_RECORD:
        raise ValueError("record too long")
    return _U16.pack(len(record)) + record


def _txid(txid: bytes) -> bytes:
    if len(txid) != TXID_SIZE:
        raise ValueError("a TxID is 12 bytes")
    return txid


@dataclass(frozen=True)
class Ping:
    txid: bytes
    padding: int = 0
    message_type = PING

    def encode(self) -> bytes:
        return _txid(self.txid) + bytes(self.padding)


@dataclass(frozen=True)
class Pong:
    txid: bytes
    observed: Address
    message_type = PONG

    def encode(self) -> bytes:
        return _txid(self.txid) + encode_address(self.observed)


@dataclass(frozen=True)
class Register:
    txid: bytes
    lan: tuple[Address, ...]
    record: bytes = b""
    message_type = REGISTER

    def encode(self) -> bytes:
        return _txid(self.txid) + _addresses(self.lan) + _record(self.record)


@dataclass(frozen=True)
class Registered:
    txid: bytes
    observed: Address
    valid_for: int  # seconds
    message_type = REGISTERED

    def encode(self) -> bytes:
        return _txid(self.txid) + encode_address(self.observed) + _U16.pack(self.valid_for)


@dataclass(frozen=True)
class Lookup:
    txid: bytes
    target: bytes  # raw NodeId
    message_type = LOOKUP

    def encode(self) -> bytes:
        if len(self.target) != 32:
            raise ValueError("a NodeId is 32 bytes")
        return _txid(self.txid) + self.target


@dataclass(frozen=True)
class LookupReply:
    txid: bytes
    target: bytes
    found: bool
    observed: tuple[Address, ...] = ()
    lan: tuple[Address, ...] = ()
    record: bytes = b""
    message_type = LOOKUP_REPLY

    def encode(self) -> bytes:
        return (_txid(self.txid) + self.target + bytes((int(self.found),)) + _addresses(self.observed)
                + _addresses(self.lan) + _record(self.record))


@dataclass(frozen=True)
class Introduction:
    caller: bytes
    target: bytes
    relay: bytes
    observed: Address
    lan: tuple[Address, ...]
    nonce: bytes
    expires_ms: int
    signature: bytes = b""
    message_type = INTRODUCTION

    def signed_part(self) -> bytes:
        if len(self.nonce) != 16 or not all(len(key) == 32 for key in (self.caller, self.target, self.relay)):
            raise ValueError("bad introduction field sizes")
        return (self.caller + self.target + self.relay + encode_address(self.observed) + _addresses(self.lan)
                + self.nonce + _U64.pack(self.expires_ms))

    def encode(self) -> bytes:
        if len(self.signature) != 64:
            raise ValueError("an introduction is signed (64 bytes)")
        return self.signed_part() + self.signature


Message = Ping | Pong | Register | Registered | Lookup | LookupReply | Introduction


def decode_body(message_type: int, body: bytes) -> Message:
    """The message of that type; Malformed for anything else (unknown types too)."""
    reader = _Reader(body)
    message: Message
    if message_type == PING:
        message = Ping(reader.take(TXID_SIZE), len(body) - TXID_SIZE)
        reader.offset = len(body)
    elif message_type == PONG:
        message = Pong(reader.take(TXID_SIZE), reader.address())
    elif message_type == REGISTER:
        message = Register(reader.take(TXID_SIZE), reader.addresses(), reader.record())
    elif message_type == REGISTERED:
        message = Registered(reader.take(TXID_SIZE), reader.address(), reader.u16())
    elif message_type == LOOKUP:
        message = Lookup(reader.take(TXID_SIZE), reader.take(32))
    elif message_type == LOOKUP_REPLY:
        txid, target, found = reader.take(TXID_SIZE), reader.take(32), reader.u8()
        if found > 1:
            raise Malformed("found flag")
        message = LookupReply(txid, target, bool(found), reader.addresses(), reader.addresses(), reader.record())
    elif message_type == INTRODUCTION:
        message = Introduction(reader.take(32), reader.take(32), reader.take(32), reader.address(),
                               reader.addresses(), reader.take(16), reader.u64(), reader.take(64))
    else:
        raise Malformed(f"unknown rendezvous message type {message_type}")
    reader.end()
    return message
