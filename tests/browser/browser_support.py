"""Debian's headless Chromium driving a page bundled with esbuild, for the browser tests:
a small trio + h11 web server serves the page and takes the report the page PUTs back;
one browser launch runs a whole plan."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import h11
import trio

REPO = Path(__file__).resolve().parents[2]
BROWSER_DIR = REPO / "tests" / "browser"
NODE_MODULES = REPO / "tests" / "node" / "node_modules"
CHROMIUM = "chromium-headless-shell"  # Debian package chromium-headless-shell (make system installs it)
INDEX = b"<!doctype html><meta charset=utf-8><title>grpc-web</title><script src=bundle.js></script>"


def chromium_path() -> str:
    path = shutil.which(CHROMIUM)
    if path is None:
        raise RuntimeError(f"{CHROMIUM} is not installed: run `make system` (make test does)")
    return path


async def bundle_page(entry: str = "page.js") -> bytes:
    """esbuild (npm) bundles tests/browser/<entry> and its imports for the browser."""
    esbuild = NODE_MODULES / ".bin" / "esbuild"
    if not esbuild.exists():
        raise RuntimeError("esbuild is missing from tests/node/node_modules: run `make node` (make test does)")
    result = await trio.run_process(
        [str(esbuild), str(BROWSER_DIR / entry), "--bundle", "--format=iife", "--platform=browser", "--log-level=warning"],
        capture_stdout=True, capture_stderr=True, check=False, env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )
    if result.returncode != 0:
        raise RuntimeError(f"esbuild failed: {result.stderr.decode()}")
    return bytes(result.stdout)


@dataclass
class PageServer:
    port: int
    bundle: bytes
    reports: list[Any] = field(default_factory=list)
    reported: trio.Event = field(default_factory=trio.Event)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        body = bytearray()
        request: h11.Request | None = None
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                connection.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                await self.answer(stream, connection, request, bytes(body))
                return
            else:
                return

    async def answer(self, stream: trio.SocketStream, connection: h11.Connection, request: h11.Request, body: bytes) -> None:
        path = request.target.split(b"?", 1)[0]
        status, content, kind = 404, b"", b"text/plain"
        if request.method == b"GET" and path == b"/":
            status, content, kind = 200, INDEX, b"text/html"
        elif request.method == b"GET" and path == b"/bundle.js":
            status, content, kind = 200, self.bundle, b"text/javascript"
        elif request.method == b"PUT" and path == b"/result":
            self.reports.append(json.loads(body))
            self.reported.set()
            status = 204
        headers = [(b"content-type", kind), (b"content-length", str(len(content)).encode()), (b"connection", b"close")]
        data = connection.send(h11.Response(status_code=status, headers=headers))
        data += connection.send(h11.Data(data=content)) if content else b""
        data += connection.send(h11.EndOfMessage())
        await stream.send_all(data)


@asynccontextmanager
async def page_server() -> AsyncIterator[PageServer]:
    bundle = await bundle_page()
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        server = PageServer(listeners[0].socket.getsockname()[1], bundle)
        nursery.start_soon(trio.serve_listeners, server.serve, listeners)
        yield server
        nursery.cancel_scope.cancel()


async def wait_group_gone(group: int, timeout: float = 10) -> None:
    """Until no process of the group is left, for a while: children reparented to an init
    that does not reap would stay as zombies, which still count as members."""
    with trio.move_on_after(timeout):
        while True:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            await trio.sleep(0.05)


async def run_page(server: PageServer, plan: list[dict[str, Any]], timeout: float = 180) -> Any:
    """Launch Chromium once on the page with ``plan``; the report it PUTs back."""
    url = f"{server.origin}/?plan={quote(json.dumps(plan))}"
    with tempfile.TemporaryDirectory(prefix="keynode-chromium-") as profile:
        command = [
            chromium_path(), "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={profile}", url,
        ]
        log_path = Path(profile) / "chromium.log"
        with open(log_path, "wb") as log:
            # Its own process group: /usr/bin/chromium-headless-shell is a shell wrapper, and
            # the browser forks zygote, GPU, network and renderer processes; all must go.
            process = await trio.lowlevel.open_process(
                command, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
            )
        try:
            with trio.move_on_after(timeout):
                await server.reported.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            await wait_group_gone(process.pid)
        said = log_path.read_bytes()[-3000:].decode(errors="replace")
    if not server.reports:
        raise AssertionError(f"the page reported nothing within {timeout} s; chromium said: {said}")
    return server.reports[-1]
