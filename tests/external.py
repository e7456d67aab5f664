"""Start the real Prometheus and Pushgateway binaries on free loopback ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

# Debian's packages name the Pushgateway binary prometheus-pushgateway.
PUSHGATEWAY_NAMES = ("prometheus-pushgateway", "pushgateway")


def find_binary(*names: str) -> str:
    """Return the path of the first binary found, or skip (fail under CI)."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = (
        f"{' or '.join(names)} is not installed; on Debian run "
        "'apt-get install prometheus prometheus-pushgateway'"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Poll ``url`` until it answers 200, failing if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready within {timeout} s")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate ``process`` and wait for it, killing it after 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def run_binary(
    args: Sequence[str], ready_url: str, log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server binary until the block ends, with its output in ``log_path``."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(ready_url, process)
            yield process
        finally:
            stop_process(process)


@contextmanager
def pushgateway(workdir: Path) -> Iterator[str]:
    """Run a Pushgateway on a free port and yield its base URL."""
    binary = find_binary(*PUSHGATEWAY_NAMES)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # An empty persistence file keeps the groups in memory only; Debian's
    # binary otherwise loads and saves /var/lib/prometheus/pushgateway.data.
    args = [
        binary,
        f"--web.listen-address=127.0.0.1:{port}",
        "--persistence.file=",
    ]
    with run_binary(args, f"{url}/-/ready", workdir / "pushgateway.log"):
        yield url


@contextmanager
def prometheus(config_file: Path, workdir: Path) -> Iterator[str]:
    """Run Prometheus with ``config_file`` on a free port and yield its base URL."""
    binary = find_binary("prometheus")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with run_binary(args, f"{url}/-/ready", workdir / "prometheus.log"):
        yield url
