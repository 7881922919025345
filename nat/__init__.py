"""keynode data-transfer layer: one UDP socket, uTP (BEP 29), out-of-band messages."""

from nat.errors import *  # noqa: F401,F403
from nat.message import PING, PONG, MessageType, classify_datagram, decode_message, encode_message
from nat.stream import UtpStream
from nat.endpoint import Endpoint, EndpointStats, open_endpoint
