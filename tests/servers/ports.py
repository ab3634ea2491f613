"""Servers that the tests and benchmarks start: each on a free port, and checked to be our own process.

A port chosen free (bind port 0, read it, close) can be taken by another process before our server
binds it. `start_server` closes that race by starting again on another port when the server exits
(address in use) or when something else answers there, and reports success only once the process
we started is alive and is the one listening on the port (psutil reads the listening sockets of our
own children without root). Used by `tests/` and `bench/` alike: the one copy.

    process, port = start_server(lambda port: subprocess.Popen([..., "--port", str(port)]),
                                 ready=http_answers("/api/mosaics"))
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import psutil

HOST = "127.0.0.1"


class ServerIdentityError(RuntimeError):
    """What answers on the port is not the server we started (or that server never answered)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may take it before it is bound)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def tcp_answers(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        return False
    return True


def http_answers(path: str) -> Callable[[int], bool]:
    """A readiness check: an HTTP GET of `path` on the port gets an answer (any status: a server
    that asks for a token answers 401, and a stranger's 404 is still an answer, for the identity
    check to reject)."""

    def answers(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    return answers


def listeners(port: int) -> set[int | None]:
    """The processes listening on TCP `port` (None for those of other users, which psutil cannot name)."""
    return {c.pid for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` or one of its descendants listens on TCP `port`."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for process in family:
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in process.net_connections(kind="tcp")):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return False


def check_own_server(pid: int, port: int) -> None:
    """Raise unless process `pid` (or a descendant) is alive and listening on `port`.

    Raises:
        ServerIdentityError: naming the port, our process and whoever holds the port instead.
    """
    if listens_on(pid, port):
        return
    holders = listeners(port)
    held = (f"held by process {', '.join(str(p) for p in sorted(holders, key=str))}" if holders
            else "held by nobody")
    try:
        alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    raise ServerIdentityError(
        f"127.0.0.1:{port} is {held}, not by the server we started (process {pid}, "
        f"{'alive' if alive else 'exited'}): another program took the port. Start the server on another "
        "port (start_server does, unless given a fixed one)."
    )


def start_server(launch: Callable[[int], subprocess.Popen[Any]], ready: Callable[[int], bool] = tcp_answers, *,
                 port: int | None = None, seconds: float = 60, attempts: int = 3,
                 log: Callable[[subprocess.Popen[Any]], str] | None = None) -> tuple[subprocess.Popen[Any], int]:
    """Start a server with `launch(port)` and return it, with its port, once it answers and is ours.

    Args:
        launch: starts the server process listening on 127.0.0.1 at the port it is given.
        ready: whether the port answers yet (default: it accepts TCP connections).
        port: a port fixed in advance (e.g. already written into the environment): one attempt.
        seconds: how long each attempt may take to answer.
        attempts: tries on fresh ports when the server exits or something else answers on its port.
        log: the stopped server's output, for the error message (default: its stdout, when piped).

    Raises:
        ServerIdentityError: each attempt's port answered from another process, or the server exited
            or did not answer in time (the log's tail says why).
    """
    tries = 1 if port is not None else attempts
    problem = ""
    for _ in range(tries):
        chosen = port if port is not None else free_port()
        process = launch(chosen)
        problem = _first_answer(process, chosen, ready, seconds)
        if not problem:
            return process, chosen
        stop(process)
    tail = (log or output)(process)[-3000:]
    raise ServerIdentityError(f"{problem} (attempt {tries} of {tries})" + (f":\n{tail}" if tail else ""))


def _first_answer(process: subprocess.Popen[Any], port: int, ready: Callable[[int], bool], seconds: float) -> str:
    """Wait for `process` to answer on `port`: '' once it does and is the listener, else what went wrong."""
    deadline = time.monotonic() + seconds
    while process.poll() is None:
        if ready(port):
            try:
                check_own_server(process.pid, port)
            except ServerIdentityError as error:
                return str(error)
            return ""
        if time.monotonic() > deadline:
            return f"the server did not answer on 127.0.0.1:{port} within {seconds:.0f} s"
        time.sleep(0.1)
    # most often another process bound the port first: address in use
    return f"the server exited ({process.returncode}) before answering on 127.0.0.1:{port}"


def output(process: subprocess.Popen[Any]) -> str:
    """What a stopped process wrote to its piped stdout ('' when not piped)."""
    if process.stdout is None:
        return ""
    text = process.communicate(timeout=10)[0]
    return text.decode(errors="replace") if isinstance(text, bytes) else str(text)


def stop(process: subprocess.Popen[Any], seconds: float = 10) -> None:
    """Terminate `process`, then kill it if it has not exited within `seconds`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
