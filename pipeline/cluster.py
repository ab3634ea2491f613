"""Connecting to Ray: the one place tessera starts an embedded Ray or joins a cluster.

What it promises, measured on Ray 2.60:

- An address that is not a usable Ray cluster fails within seconds, in one line that says what to
  do. Unchecked, `ray.init` retried a closed or silent port for minutes (each of its 20 tries took
  41 s and printed three lines of Ray's log); the other kind of Ray port (the Ray Client port given
  as a GCS address, or the reverse) failed after 20 to 30 s, and a cluster that wants a token after
  20 s, both saying only that it could not connect. Ray reads its gRPC timeouts once, when it is
  imported, so they cannot be shortened here; `check_address` instead asks the port the question
  `ray.init` asks first (the GCS's cluster id, or a Ray Client ping), with a deadline of its own.
- Ray is quiet unless asked (`verbose=True`): its notices (token authentication, "Started a local
  Ray instance") and the workers' output stay in Ray's log files (/tmp/ray/session_*/logs); errors
  raised in workers still reach the driver as exceptions. The one line no Ray setting keeps off the
  terminal, the C++ core's warning when restartable actors get arguments from the object store, is
  kept off by creating them inside `native_ray_lines_in_log_only`. The cluster's messages to the driver
  (a task retried after a node was lost, the lost node's last raylet log lines) go to tessera's log
  too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError

CONNECT_TIMEOUT = 10.0  # seconds for a cluster to answer; a gRPC handshake takes milliseconds on a LAN
CLIENT_PORT = 10001  # Ray Client's default port, when a ray:// address names none

_FIX = (
    "Start the cluster with `ray start --head`, check the address and port (host:6379, the head's GCS port; "
    "ray://host:10001 for Ray Client), or leave --ray-address unset to run on this machine."
)
# Ray Client's head starts one server process per driver by fork() from a multi-threaded gRPC server,
# and the child can crash before it runs (ray-project/ray#63202): the driver is told only this. Measured
# on Ray 2.60 with grpcio 1.85 on a 2-core machine: 4 joins in 5 failed so; none in 3 with
# GRPC_ENABLE_FORK_SUPPORT=0 in the head's environment. Each failed try takes about 2 s.
_CLIENT_SERVER_DIED = "Initialization failure from server"
CLIENT_START_TRIES = 4
_CLIENT_SERVER_FIX = (
    f"Ray Client's server on the head crashed as it started, {CLIENT_START_TRIES} times (a known Ray bug, "
    "ray-project/ray#63202): start the head with GRPC_ENABLE_FORK_SUPPORT=0 in its environment, or give the "
    "head's GCS address (host:6379) instead of ray://."
)
# A line of Ray's C++ log, e.g. "[2026-11-29 10:45:34,003 E 7454 7454] core_worker.cc:2465: ...".
_NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [TDIWEF] \d+ \d+\] [\w.]+\.(?:cc|h):\d+: ")


@dataclass(frozen=True)
class _Endpoint:
    """Where an address points: a head's GCS port, or a Ray Client server."""

    host: str
    port: int
    client: bool

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def check_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Check that a Ray cluster answers at `address`, before `ray.init` would hang on it.

    Args:
        address: "host:port" (the head's GCS port), "ray://host:port" (Ray Client), "auto" (the
            cluster Ray itself would find: RAY_ADDRESS, the address file of the last `ray start`, a
            running raylet) or "local" (an embedded Ray: nothing to check).
        timeout: seconds the whole check may take.

    Raises:
        ConfigError: in one line, naming the address, why it is not a usable Ray cluster (refused, no
            answer, not Ray, the other kind of Ray port, a token needed) and the fix.

    Example:
        >>> check_address("127.0.0.1:1")  # doctest: +SKIP
        ConfigError: The Ray cluster at 127.0.0.1:1 cannot be reached (connection refused: nothing ...
    """
    if address.strip() == "local":
        return
    deadline = time.monotonic() + timeout
    if address.strip() == "auto":
        endpoint = _resolve_auto()
        address = f"auto ({endpoint})"
    else:
        endpoint = _parse(address)
    cause, fix = _probe(endpoint, deadline, timeout)
    if cause:
        raise ConfigError(f"The Ray cluster at {address} cannot be reached ({cause}). {fix or _FIX}")


def connect_ray(address: str | None, workers: int, object_store: int | None = None, verbose: bool = False) -> bool:
    """Join a Ray cluster, or start an embedded one; True when this call started Ray.

    No address means a new embedded Ray, even if a `ray start` head runs on this machine, except
    inside a job submitted through the Ray Jobs API, where RAY_ADDRESS names the job's cluster.

    Args:
        address: as `check_address` takes it, or None (RAY_ADDRESS, else an embedded Ray).
        workers: CPUs an embedded Ray offers at least (it offers all of this machine's).
        object_store: bytes that bound an embedded Ray's object store (a cluster's is set by `ray start`).
        verbose: show Ray's own notices and the workers' output here, not only in Ray's log files.

    Returns:
        True when this call started (or joined) Ray and so should shut it down; False when Ray was
        already initialised in this process.

    Raises:
        ConfigError: the cluster cannot be reached or joined (see `check_address`).
    """
    import ray

    _cluster_messages_to_log(not verbose)
    if ray.is_initialized():
        return False
    output: dict[str, Any] = {
        # ERROR keeps Ray's Python notices (token authentication, "Started a local Ray instance")
        # off the terminal; workers' stdout and stderr stay in their files under the session's logs.
        "logging_level": logging.INFO if verbose else logging.ERROR,
        "log_to_driver": verbose,
    }
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.strip() != "local":
        check_address(address)
        for attempt in range(1, CLIENT_START_TRIES + 1):
            try:
                ray.init(address=address.strip(), **output)
                break
            except (ConnectionError, RuntimeError, ray.exceptions.RayError) as exc:
                if _CLIENT_SERVER_DIED in str(exc) and attempt < CLIENT_START_TRIES:
                    continue  # Ray Client's per-driver server died as it started: a new one is started
                fix = _CLIENT_SERVER_FIX if _CLIENT_SERVER_DIED in str(exc) else _FIX
                cause = _first_line(exc)
                raise ConfigError(f"The Ray cluster at {address} cannot be joined ({cause}). {fix}") from None
    else:
        # One process each to spill and restore the waiting seam sums: each is a Python process of
        # about 80 MB, and Ray's default of up to 4 of each made peak memory grow with the image.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False,
                 object_store_memory=object_store, _system_config={"max_io_workers": 1}, **output)
    return True


_quiet_cluster_messages = False
# What the cluster tells the driver about a loss tessera recovers from: a task retried, a node marked dead,
# and the tail of that node's raylet log. Anything else (a task that cannot be scheduled, a version
# mismatch) is printed as Ray prints it.
_RECOVERED = re.compile(r"retries remaining|Raylet is terminated|marked (as )?dead|has died")


def _cluster_messages_to_log(quiet: bool) -> None:
    """Keep the cluster's messages about losses tessera recovers from (a task retried, a node marked dead
    with the last lines of its raylet's log) off the terminal unless `verbose` (DEBUG in tessera's log).
    Ray prints them to stdout from a thread of its own whatever `log_to_driver` says, through
    `print_to_stdstream`, marked as the raylet's; its other messages are printed as before."""
    global _quiet_cluster_messages
    import ray._private.worker as ray_worker

    _quiet_cluster_messages = quiet
    if getattr(ray_worker.print_to_stdstream, "tessera", False):
        return
    printer = ray_worker.print_to_stdstream

    def print_to_stdstream(data: dict[str, Any], ignore_prefix: bool) -> None:
        if _quiet_cluster_messages and data.get("pid") == "raylet":
            kept = []
            for message in map(str, data.get("lines", [])):  # each may run to many lines
                if _RECOVERED.search(message):
                    logging.getLogger(__name__).debug("Ray: %s", message)
                else:
                    kept.append(message)
            if not kept:
                return
            data = {**data, "lines": kept}
        printer(data, ignore_prefix)

    print_to_stdstream.tessera = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream


@contextlib.contextmanager
def native_ray_lines_in_log_only(verbose: bool = False) -> Iterator[None]:
    """Keep the lines Ray's C++ core writes to this process's stderr meanwhile off the terminal.

    Ray's C++ logger sends every ERROR line to both the driver's log file and stderr, and no setting
    separates the two (RAY_BACKEND_LOG_LEVEL=fatal drops them from the file too, and from every Ray
    process started after it). Ray prints one such line, once a process, when the process first
    creates an actor with max_restarts > 0 and constructor arguments in the object store, as tessera's
    workers are made; creating them inside this block keeps it in the log only. Anything else written
    to stderr meanwhile (by any thread) is passed on when the block ends. With `verbose`, nothing is
    held back. File descriptor 2 is the whole process's: one such block at a time.

    Example:
        >>> with native_ray_lines_in_log_only(verbose):  # doctest: +SKIP
        ...     actors = [actor_cls.remote(setup_ref) for _ in range(workers)]
    """
    if verbose:
        yield
        return
    sys.stderr.flush()
    try:
        terminal = os.dup(2)
    except OSError:  # no stderr to protect
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(terminal, 2)
            os.close(terminal)
            held.seek(0)
            kept = b"".join(line for line in held.read().splitlines(keepends=True) if not _NATIVE_LINE.match(line))
            if kept:
                os.write(2, kept)


def _parse(address: str) -> _Endpoint:
    """The endpoint an address names; ConfigError for one `ray.init` would not take."""
    text = address.strip()
    client = text.startswith("ray://")
    if client:
        text = text[len("ray://"):]
    elif "://" in text:
        raise ConfigError(
            f"Ray address {address!r} is not one tessera can join: give host:port (the head's GCS port, 6379 by "
            "default), ray://host:10001 (Ray Client) or auto, or leave --ray-address unset to run on this machine."
        )
    try:
        parts = urllib.parse.urlsplit(f"//{text}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if port is None and client and host:
        port = CLIENT_PORT
    if not host or port is None:
        raise ConfigError(
            f"Ray address {address!r} has no valid host and port: give host:port (the head's GCS port, 6379 by "
            "default) or ray://host:10001 (Ray Client), or leave --ray-address unset to run on this machine."
        )
    return _Endpoint(host, port, client)


def _resolve_auto() -> _Endpoint:
    """The cluster `ray.init(address="auto")` would join, found the way Ray finds it."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address("auto")
    except ConnectionError:
        found = None
    if not found:
        raise ConfigError(
            "Ray address 'auto' found no Ray cluster on this machine (no RAY_ADDRESS, no address file of a "
            "`ray start`, no running raylet). Start one with `ray start --head`, give its address, or leave "
            "--ray-address unset to run on this machine."
        )
    # For "auto" (only), ray.init switches on token authentication when this machine has a token;
    # do it now so that the probe below asks the way ray.init will. Ray's notice that it did so is
    # not shown: ray.init, which would show it, finds the switch already made.
    notices = logging.getLogger(maybe_enable_token_auth_if_token_available.__module__)
    level = notices.level
    notices.setLevel(logging.ERROR)
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        notices.setLevel(level)
    return _parse(found)


def _probe(endpoint: _Endpoint, deadline: float, timeout: float) -> tuple[str, str]:
    """Why `endpoint` is not a Ray port of its kind, and the fix when it is not the usual one; ("", "") when it is."""
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=max(deadline - time.monotonic(), 0.1)):
            pass
    except socket.gaierror as exc:
        return f"host {endpoint.host!r} is not known: {exc.strerror}", ""
    except ConnectionRefusedError:
        return "connection refused: nothing listens on that port", ""
    except TimeoutError:
        return f"no answer within {timeout:g} s", ""
    except OSError as exc:
        return exc.strerror or str(exc), ""
    return _ask_ray(endpoint, deadline, timeout)


def _ask_ray(endpoint: _Endpoint, deadline: float, timeout: float) -> tuple[str, str]:
    """Ask the question `ray.init` asks first: the GCS's cluster id, or a Ray Client ping."""
    import grpc
    from ray._private.grpc_utils import init_grpc_channel  # TLS and the token, as Ray's own clients use them
    from ray.core.generated import ray_client_pb2

    if endpoint.client:
        method = "/ray.rpc.RayletDriver/ClusterInfo"
        ping = ray_client_pb2.ClusterInfoType.PING  # type: ignore[attr-defined]  # generated, without stubs
        request = ray_client_pb2.ClusterInfoRequest(type=ping).SerializeToString()  # type: ignore[attr-defined]
    else:
        method, request = "/ray.rpc.NodeInfoGcsService/GetClusterId", b""
    channel = init_grpc_channel(str(endpoint))
    try:
        grpc.channel_ready_future(channel).result(timeout=max(deadline - time.monotonic(), 0.1))
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        call(request, timeout=max(deadline - time.monotonic(), 0.1))
    except grpc.FutureTimeoutError:
        return f"the port accepts connections but did not answer as Ray does within {timeout:g} s", ""
    except grpc.RpcError as exc:
        return _rpc_failure(endpoint, exc.code(), exc.details() or "")
    finally:
        channel.close()
    return "", ""


def _rpc_failure(endpoint: _Endpoint, code: Any, details: str) -> tuple[str, str]:
    """The cause and fix for a gRPC status other than OK."""
    import grpc
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    if code == grpc.StatusCode.UNIMPLEMENTED and endpoint.client:
        return "not a Ray Client server", (
            f"If it is the head's GCS port, give {endpoint} without ray://; Ray Client listens on port 10001 "
            "unless `ray start --ray-client-server-port` says otherwise."
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "not a Ray head's GCS port", (
            f"If it is the Ray Client port, give ray://{endpoint}; the GCS listens on the port of "
            "`ray start --head --port` (6379 by default)."
        )
    if code == grpc.StatusCode.UNAUTHENTICATED and is_token_auth_enabled():
        return "the cluster refused this machine's token", (
            "Set RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on the head prints it)."
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "the cluster requires a token", (
            "Set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token "
            "(`ray get-auth-token` on the head prints it)."
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "the port accepts connections but did not answer as Ray does in time", ""
    return f"gRPC {getattr(code, 'name', code)}: {_first_line(details)}", ""


def _first_line(error: object) -> str:
    """The first non-blank line of an error's text (Ray's run to many lines)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
