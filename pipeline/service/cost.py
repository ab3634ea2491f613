"""What the service spends on a request, bounded: heavy requests share a memory budget, a client that
leaves stops its work, and a request that stalls while it is being sent is closed.

- `HeavyRequests` (ASGI): at most `slots` heavy requests (regions, polygons, areas, statistics,
  source-preview tiles) run at once; the others wait up to `wait_s`, then get 503 with Retry-After.
  Cheap requests (listing, metadata, point, mask tiles) pass without waiting. A heavy request's
  scope carries a `threading.Event` (`CANCELLED`) set when its client disconnects.
- `HeaderDeadline` (uvicorn's h11 protocol): a request line and headers not received in full within
  `timeout` seconds close the connection (uvicorn itself times out only idle kept-alive connections).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import h11
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.memory import release_memory

CANCELLED = "tessera.cancelled"  # scope key: a threading.Event set when the client has gone
HEAVY = re.compile(r"^/api/mosaics/.+/(region\.png|region\.npy|polygons\.geojson|areas|stats)$")
SOURCE_TILE = re.compile(r"^/api/mosaics/.+/tiles/\d+/\d+/\d+\.png$")

Receive = Callable[[], Awaitable[dict[str, Any]]]


def is_heavy(scope: dict[str, Any]) -> bool:
    """Whether a request may build a large answer: a region, polygons, areas, statistics, a source tile
    (a source tile may read the source image at full resolution)."""
    path = scope.get("path", "")
    if HEAVY.match(path):
        return True
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))  # decoded: layer=%73ource is source too
    return bool(SOURCE_TILE.match(path)) and any(k == "layer" and v == "source" for k, v in query)


class HeavyRequests:
    """ASGI middleware: at most `slots` heavy requests at once, each told when its client leaves."""

    def __init__(self, app: Any, slots: int, wait_s: float) -> None:
        self.app = app
        self.slots = slots
        self.wait_s = wait_s
        self._free: asyncio.Semaphore | None = None  # made on the server's loop, at the first request

    async def __call__(self, scope: Any, receive: Receive, send: Any) -> None:
        if scope["type"] != "http" or not is_heavy(scope):
            await self.app(scope, receive, send)
            return
        if self._free is None:
            self._free = asyncio.Semaphore(self.slots)
        try:
            await asyncio.wait_for(self._free.acquire(), self.wait_s)
        except TimeoutError:
            retry = max(1, round(self.wait_s))
            await JSONResponse(
                {"detail": f"the server is busy with {self.slots} large requests (its memory budget, "
                           f"--max-memory); try again in {retry} s, or ask for a smaller region"},
                status_code=503, headers={"Retry-After": str(retry)})(scope, receive, send)
            return
        cancelled = threading.Event()
        scope[CANCELLED] = cancelled
        messages: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()

        async def watch() -> None:
            """Read the client's messages ahead (the body, then a disconnect), so that a disconnect is seen
            while the answer is computed in a worker thread."""
            try:
                while True:
                    message = await receive()
                    await messages.put(message)
                    if message["type"] == "http.disconnect":
                        cancelled.set()
                        return
            except Exception as e:  # an over-long or stalled body (BodyLimit): the app's receive raises it
                await messages.put(e)

        async def received() -> dict[str, Any]:
            message = await messages.get()
            if isinstance(message, BaseException):
                raise message
            if message["type"] == "http.disconnect":
                await messages.put(message)  # asked again, it is still gone
            return message

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.sleep(0)  # a client gone while this request waited: seen before any work starts
            if not cancelled.is_set():
                await self.app(scope, received, send)
        finally:
            watcher.cancel()
            self._free.release()
            release_memory()  # the answer's arrays freed: hand the heap back, so memory falls after a burst


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request line and headers take over `timeout` s.

    uvicorn times out a kept-alive connection only while it is idle after an answer; one that opens and
    sends part of a request (or nothing) would otherwise be held for ever. Set `timeout` on a subclass
    (`with_timeout`), since uvicorn makes the protocol from its class.
    """

    timeout: float = 10.0

    @classmethod
    def with_timeout(cls, timeout: float) -> type[HeaderDeadline]:
        return type("HeaderDeadline", (cls,), {"timeout": timeout})

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and self.timeout_keep_alive_task is None:
            self._arm()  # part of a new request's head has come: it has `timeout` s to come whole
        elif self.conn.their_state is not h11.IDLE:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # idle now: uvicorn's keep-alive timeout applies
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
