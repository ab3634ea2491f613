"""start_server and check_own_server: success only when the process we started is the one answering."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from tests.servers import ports
from tests.servers.ports import ServerIdentityError, check_own_server, http_answers, start_server, stop

STRANGER = ("import socket, time; s = socket.create_server(('127.0.0.1', 0)); "
            "print(s.getsockname()[1], flush=True); time.sleep(120)")


@pytest.fixture
def stranger() -> Iterator[tuple[int, int]]:
    """Another process listening on 127.0.0.1 (it accepts connections, as any server would): (pid, port)."""
    process = subprocess.Popen([sys.executable, "-c", STRANGER], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    port = int(process.stdout.readline())
    yield process.pid, port
    stop(process)


def http_server(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def idle(port: int) -> subprocess.Popen[bytes]:
    """A process that is told a port and never listens on it."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_start_server_returns_the_process_listening_on_its_port() -> None:
    process, port = start_server(http_server, http_answers("/"), seconds=30)
    try:
        assert port in {c.laddr.port for c in psutil.Process(process.pid).net_connections("tcp")
                        if c.status == psutil.CONN_LISTEN}
        check_own_server(process.pid, port)
    finally:
        stop(process)


def test_a_stranger_answering_on_a_fixed_port_is_refused_naming_it(stranger: tuple[int, int]) -> None:
    holder, port = stranger
    launched: list[subprocess.Popen[bytes]] = []

    def launch(port: int) -> subprocess.Popen[bytes]:
        launched.append(idle(port))
        return launched[-1]

    with pytest.raises(ServerIdentityError) as error:
        start_server(launch, port=port, seconds=30)
    message = str(error.value)
    assert f"127.0.0.1:{port} is held by process {holder}" in message, message
    assert f"not by the server we started (process {launched[0].pid}" in message, message
    assert len(launched) == 1 and launched[0].poll() is not None  # one attempt, and ours is stopped


def test_a_port_taken_first_is_given_up_for_another(stranger: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    _, taken = stranger
    offered, free = iter([taken]), ports.free_port  # the stranger's port first, as if taken in the race
    monkeypatch.setattr(ports, "free_port", lambda: next(offered, None) or free())
    process, port = start_server(http_server, http_answers("/"), seconds=30)
    try:
        assert port != taken
        check_own_server(process.pid, port)
    finally:
        stop(process)


def test_an_in_process_server_is_ours_and_a_child_is_not_its_listener() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        check_own_server(os.getpid(), port)  # a server thread of this process, as moto's in the tests
        child = idle(port)
        try:
            with pytest.raises(ServerIdentityError, match=f"held by process {os.getpid()}"):
                check_own_server(child.pid, port)
        finally:
            stop(child)

