"""curl through the CONNECT port (``curl -p -x``) to a plain HTTP server behind the remote node."""

from __future__ import annotations

import hashlib
import os
import shutil

import h11
import trio

from proxy.tunnel.address_book import AddressBook
from tests.proxy.test_proxy_support import TOKEN, running_node, tcp_server

BODY = os.urandom(3 << 20)


async def http_file_server(stream: trio.SocketStream) -> None:
    """One HTTP/1.1 exchange with h11: GET /file -> BODY, anything else -> 404."""
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        if isinstance(event, h11.Request):
            found = event.target == b"/file"
            body = BODY if found else b"not found\n"
            headers = [("content-length", str(len(body))), ("x-sha256", hashlib.sha256(body).hexdigest())]
            await stream.send_all(conn.send(h11.Response(status_code=200 if found else 404, headers=headers)))
            await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            return
        if isinstance(event, h11.ConnectionClosed):
            return


async def test_curl_through_the_connect_port() -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is required (installed by `make system`)"
    with trio.fail_after(30):
        async with tcp_server(http_file_server) as server, running_node(server.port) as remote:
            book = AddressBook({remote.node_id: ("127.0.0.1", remote.proxy.proxy_port)})
            async with running_node(address_book=book) as local:
                proxy_url = f"http://user:{TOKEN}@{local.proxy.forward_host}:{local.proxy.forward_port}"
                result = await trio.run_process(
                    [curl, "-sS", "--fail", "-p", "-x", proxy_url, f"http://{remote.node_id}:443/file"],
                    capture_stdout=True,
                    capture_stderr=True,
                )
                assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(BODY).digest()
                # Without the token curl is told 407.
                denied = await trio.run_process(
                    [curl, "-sS", "-p", "-x", f"http://{local.proxy.forward_host}:{local.proxy.forward_port}",
                     "-o", "/dev/null", "-w", "%{http_connect}", f"http://{remote.node_id}:443/file"],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                assert denied.returncode != 0
                assert denied.stdout == b"407"
