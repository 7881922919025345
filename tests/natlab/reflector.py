"""A UDP reflector: answers every datagram with the source address it observed.

Run inside a lab namespace, bound to one or more ip:port pairs:

    python3 reflector.py 198.18.1.2:4000 198.18.1.3:4000

Reply (from the socket that received it): b"<ip> <port>\\n" followed by the
datagram's own bytes, so a client can also match replies to requests. Prints
"ready" once every socket is bound. Bounded by the caller (the lab wraps it in
`timeout`); ends on SIGTERM.
"""

from __future__ import annotations

import selectors
import signal
import socket
import sys


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, lambda _s, _f: sys.exit(0))
    selector = selectors.DefaultSelector()
    for spec in argv:
        host, _, port = spec.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.bind((host, int(port)))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            while True:
                try:
                    data, (ip, port) = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                try:
                    sock.sendto(f"{ip} {port}\n".encode() + data, (ip, port))
                except OSError:
                    continue  # unreachable sender or full buffer: a reflector stays up


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
