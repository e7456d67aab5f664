"""Pushgateways for the push mode tests: the real one, and broken stand-ins.

The real binary runs with its state in memory only. Debian's build (1.5.1)
defaults --persistence.file to /var/lib/prometheus/pushgateway.data, so every
gateway started without the flag would load and save the groups of all
earlier runs.
"""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import urllib.response
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import Samples, parse_metrics
from external import PUSHGATEWAY_NAMES, find_binary, free_port, stop_process


@contextmanager
def memory_pushgateway(
    workdir: Path,
    *,
    web_config: Path | None = None,
    scheme: str = "http",
    context: ssl.SSLContext | None = None,
    auth: tuple[str, str] | None = None,
) -> Iterator[str]:
    """Run a Pushgateway that keeps no state on disk and yield its base URL.

    ``web_config`` is the exporter-toolkit web configuration (TLS, basic auth);
    ``context`` and ``auth`` are what the readiness check needs to pass it.
    """
    binary = find_binary(*PUSHGATEWAY_NAMES)
    port = free_port()
    url = f"{scheme}://127.0.0.1:{port}"
    args = [binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="]
    if web_config is not None:
        args.append(f"--web.config.file={web_config}")
    with (workdir / f"pushgateway-{port}.log").open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(f"{url}/-/ready", process, context, auth)
            yield url
        finally:
            stop_process(process)


def _wait_ready(
    url: str,
    process: subprocess.Popen[bytes],
    context: ssl.SSLContext | None,
    auth: tuple[str, str] | None,
) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Pushgateway exited with {process.returncode}")
        try:
            with get(url, context=context, auth=auth) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not become ready within 30 s")


def get(
    url: str,
    *,
    context: ssl.SSLContext | None = None,
    auth: tuple[str, str] | None = None,
) -> urllib.response.addinfourl:
    """GET ``url`` with optional basic auth and TLS context."""
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    response: urllib.response.addinfourl = urllib.request.urlopen(
        request, timeout=5, context=context
    )
    return response


def read_gateway(
    url: str,
    *,
    context: ssl.SSLContext | None = None,
    auth: tuple[str, str] | None = None,
) -> Samples:
    """Scrape the gateway's own /metrics and index its samples."""
    with get(f"{url}/metrics", context=context, auth=auth) as response:
        return parse_metrics(response.read().decode())


@contextmanager
def hanging_server(on_connect: Callable[[], None] | None = None) -> Iterator[str]:
    """Accept connections and read from them, but never respond; yield the URL.

    ``on_connect`` runs in the server thread as each connection arrives.
    """
    with _socket_server(None, on_connect) as url:
        yield url


@contextmanager
def garbage_server() -> Iterator[str]:
    """Respond to each connection with bytes that are not HTTP; yield the URL."""
    with _socket_server(b"not an HTTP response\r\n\r\n", None) as url:
        yield url


@contextmanager
def _socket_server(
    reply: bytes | None, on_connect: Callable[[], None] | None
) -> Iterator[str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.05)
    stop = threading.Event()
    connections: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connections.append(connection)
            if on_connect is not None:
                on_connect()
            if reply is not None:
                connection.sendall(reply)
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for connection in connections:
            connection.close()
        listener.close()


@contextmanager
def status_server(status: int, requests: list[str] | None = None) -> Iterator[str]:
    """Respond to every request with ``status`` and a short body; yield the URL.

    ``requests`` collects "METHOD path" of each request.
    """

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            if requests is not None:
                requests.append(f"{self.command} {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            body = b"simulated failure\n"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST = answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
