"""pipeline.cluster against real sockets, a real Ray head on 127.0.0.1 and real drivers in subprocesses.

Drivers run in subprocesses: `connect_ray` does nothing in a process where Ray already runs (as it
does in this one once another module's embedded Ray has started), and what a driver prints is the
point of the quiet tests.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from pipeline.cluster import CONNECT_TIMEOUT, check_address
from pipeline.errors import ConfigError
from tests.conftest import REPO, RayHead, free_port, ray_head_running

# A driver as tessera's jobs are: connect, one worker built with a few MB in the object store and
# restarts allowed, a method, a worker's exception, shut down. It prints "ok" and nothing else.
DRIVER = textwrap.dedent("""
    import logging, sys, time
    import ray
    from pipeline.cluster import connect_ray, native_ray_lines_in_log_only

    class Holder:
        def __init__(self, blob: bytes) -> None:
            self.size = len(blob)
            print("constructor ran")

        def get_size(self) -> int:
            logging.getLogger("holder").warning("method ran")
            return self.size

        def fail(self) -> None:
            raise ValueError("boom")

    verbose, address = sys.argv[1] == "verbose", sys.argv[2] or None
    connect_ray(address, 1, verbose=verbose)
    with native_ray_lines_in_log_only(verbose):
        holder = ray.remote(Holder).options(num_cpus=0, max_restarts=1).remote(b"x" * 8_000_000)
    assert ray.get(holder.get_size.remote()) == 8_000_000
    try:
        ray.get(holder.fail.remote())
    except ValueError as error:  # Ray's RayTaskError(ValueError) is a ValueError
        assert "boom" in str(error)
    else:
        raise AssertionError("the worker's exception did not reach the driver")
    time.sleep(2)  # time for the workers' lines to reach the driver, were they sent
    ray.shutdown()
    print("ok")
""")

# Each address given: "reachable", or the ConfigError's message; then how long the check took.
CHECKER = textwrap.dedent("""
    import sys, time
    from pipeline.cluster import check_address, connect_ray
    from pipeline.errors import ConfigError

    for address in sys.argv[2:]:
        start = time.monotonic()
        try:
            if sys.argv[1] == "connect":
                connect_ray(address, 1)
            else:
                check_address(address)
            print("reachable")
        except ConfigError as error:
            print(error)
        print(f"{time.monotonic() - start:.2f}")
""")


def python(script: str, *args: str, env: Mapping[str, str] = {}) -> subprocess.Popen[str]:
    """`python -c script args` from the repository, with `env` over this environment (less Ray's own
    address and authentication settings, so that each run chooses its own)."""
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**base, "PYTHONPATH": str(REPO), **env})


def output(process: subprocess.Popen[str], timeout: float = 180) -> list[str]:
    """The process's output lines, once it has exited."""
    out, _ = process.communicate(timeout=timeout)
    return out.splitlines()


def checked(lines: list[str]) -> list[tuple[str, float]]:
    """CHECKER's output as (outcome, seconds) per address."""
    return [(lines[i], float(lines[i + 1])) for i in range(0, len(lines), 2)]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (the kernel completes them) and never answers."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def assert_one_line_naming(error: pytest.ExceptionInfo[ConfigError], address: str, cause: str) -> None:
    message = str(error.value)
    assert "\n" not in message and address in message and cause in message, message


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_a_closed_port_fails_at_once_in_one_line_with_the_fix(scheme: str) -> None:
    address = f"{scheme}127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ConfigError) as error:
        check_address(address)
    assert time.monotonic() - start < 5
    assert_one_line_naming(error, address, "connection refused")
    assert "ray start --head" in str(error.value) and "leave --ray-address unset" in str(error.value)


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_a_port_that_is_not_ray_fails_within_the_timeout(scheme: str, silent_port: int) -> None:
    address = f"{scheme}127.0.0.1:{silent_port}"
    start = time.monotonic()
    with pytest.raises(ConfigError) as error:
        check_address(address, timeout=1.0)
    assert 1.0 <= time.monotonic() - start < 3
    assert_one_line_naming(error, address, "did not answer as Ray does within 1 s")


def test_auto_checks_the_cluster_ray_would_choose(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # Ray's first choice for "auto"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ConfigError) as error:
        check_address("auto")
    assert_one_line_naming(error, f":{port})", "connection refused")
    assert str(error.value).startswith("The Ray cluster at auto (")


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "127.0.0.1", "127.0.0.1:port", "ray://:10001"])
def test_an_address_ray_would_not_take_is_refused_with_the_forms_it_takes(address: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_address(address)
    assert_one_line_naming(error, repr(address), "host:port")
    assert "ray://host:10001" in str(error.value)


@pytest.mark.slow
def test_connect_ray_fails_within_seconds_in_one_line_on_each_unreachable_cluster(silent_port: int) -> None:
    addresses = [f"127.0.0.1:{free_port()}", f"ray://127.0.0.1:{free_port()}", f"127.0.0.1:{silent_port}"]
    lines = output(python(CHECKER, "connect", *addresses))
    results = checked(lines)
    assert len(results) == len(addresses), lines
    for address, (message, seconds) in zip(addresses, results, strict=True):
        assert message.startswith(f"The Ray cluster at {address} cannot be reached ("), lines
        assert seconds < 30, lines
    (_, refused), (_, refused_client), (_, silent) = results
    assert refused < 5 and refused_client < 5 and CONNECT_TIMEOUT <= silent < CONNECT_TIMEOUT + 5, lines


@pytest.fixture(scope="module")
def token_head() -> Iterator[tuple[RayHead, str]]:
    """A Ray head with token authentication, as `ray start --head` has by default, and its token."""
    token = secrets.token_hex(32)
    with ray_head_running({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}) as head:
        yield head, token


@pytest.mark.slow
def test_a_head_is_joined_quietly_and_each_mistake_names_its_fix(token_head: tuple[RayHead, str]) -> None:
    head, token = token_head
    with_token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    client_as_gcs, gcs_as_client = head.client.removeprefix("ray://"), f"ray://{head.gcs}"
    runs = {  # at once: each is mostly waiting for Ray
        "token": python(CHECKER, "check", head.gcs, head.client, client_as_gcs, gcs_as_client, env=with_token),
        "no token": python(CHECKER, "check", head.gcs, head.client, env={"RAY_AUTH_MODE": "disabled"}),
        "wrong token": python(CHECKER, "check", head.gcs, env={**with_token, "RAY_AUTH_TOKEN": secrets.token_hex(32)}),
        "join": python(DRIVER, "quiet", head.gcs, env=with_token),
        "join client": python(DRIVER, "quiet", head.client, env=with_token),
    }
    lines = {name: output(run) for name, run in runs.items()}
    assert [m for m, _ in checked(lines["token"])] == [
        "reachable", "reachable",
        f"The Ray cluster at {client_as_gcs} cannot be reached (not a Ray head's GCS port). If it is the Ray "
        f"Client port, give ray://{client_as_gcs}; the GCS listens on the port of `ray start --head --port` "
        "(6379 by default).",
        f"The Ray cluster at {gcs_as_client} cannot be reached (not a Ray Client server). If it is the head's GCS "
        f"port, give {head.gcs} without ray://; Ray Client listens on port 10001 unless `ray start "
        "--ray-client-server-port` says otherwise.",
    ], lines["token"]
    assert all("(the cluster requires a token). Set RAY_AUTH_MODE=token" in m for m, _ in checked(lines["no token"]))
    assert "(the cluster refused this machine's token)" in checked(lines["wrong token"])[0][0], lines["wrong token"]
    assert lines["join"] == ["ok"] and lines["join client"] == ["ok"], lines


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """A folder for an embedded Ray's files (RAY_TMPDIR): short, as Ray's socket paths are length-limited."""
    folder = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def logged(folder: Path, pattern: str) -> str:
    """The text of the Ray log files under `folder` whose names match `pattern`."""
    return "".join(f.read_text(errors="replace") for f in folder.glob(f"ray/session_*/logs/{pattern}"))


@pytest.mark.slow
def test_an_embedded_ray_keeps_its_lines_in_its_logs_unless_verbose(ray_tmpdir: Path) -> None:
    quiet_files, verbose_files = ray_tmpdir / "quiet", ray_tmpdir / "verbose"
    quiet = python(DRIVER, "quiet", "", env={"RAY_TMPDIR": str(quiet_files)})
    verbose = python(DRIVER, "verbose", "", env={"RAY_TMPDIR": str(verbose_files)})
    quiet_lines, verbose_lines = output(quiet), output(verbose)
    assert quiet_lines == ["ok"], quiet_lines
    assert "constructor arguments in the object store" in logged(quiet_files, "python-core-driver-*.log")
    assert "constructor ran" in logged(quiet_files, "worker-*.out")
    assert "method ran" in logged(quiet_files, "worker-*.err")
    shown = "\n".join(verbose_lines)
    for ray_line in (r"Token authentication is enabled", r"Started a local Ray instance",
                     r"\] core_worker\.cc:\d+: .*constructor arguments in the object store",
                     r"\(Holder pid=\d+\)(\x1b\[0m)? constructor ran"):  # the worker's print, forwarded
        assert re.search(ray_line, shown), (ray_line, verbose_lines)
    assert verbose_lines[-1] == "ok", verbose_lines
