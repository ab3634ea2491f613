"""Who may ask the service: an optional shared token, and the Host names it answers to.

A server reached beyond 127.0.0.1 is reached by anyone on the network; `tessera serve --token`
makes every request (API, viewer, static files) carry the token, as a bearer header for programs or
as a cookie for browsers. A browser gets the cookie by opening any page once with ``?token=TOKEN``:
the service answers with the cookie and a redirect to the same page without the token, so the token
does not stay in the address bar or the history. Allowed Host names (Starlette's
TrustedHostMiddleware) stop DNS rebinding: a page on another site that points its own name at this
server's address is refused, since its requests name that site as their Host.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse, RedirectResponse

__all__ = ["COOKIE", "LOCAL_HOSTS", "TokenGate", "default_allowed_hosts"]

COOKIE = "tessera_token"
LOCAL_HOSTS = ("127.0.0.1", "localhost")


def default_allowed_hosts(host: str, given: Sequence[str] | None) -> list[str]:
    """The Host names to answer to: those `given`; else, for a server on this machine only, its own
    names (a browser page elsewhere cannot rebind a name to it); else any (set them behind a proxy)."""
    if given:
        return list(given)
    return list(LOCAL_HOSTS) if host in LOCAL_HOSTS else ["*"]


class TokenGate:
    """ASGI middleware: a request passes with ``Authorization: Bearer TOKEN`` or the token's cookie;
    ``?token=TOKEN`` on a GET sets the cookie and redirects without it; anything else gets 401."""

    def __init__(self, app: Any, token: str) -> None:
        if not token:
            raise ValueError("an empty token would let every request in")
        self.app = app
        self.token = token.encode()

    def _is_token(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.token)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        cookies = cookie_parser(headers.get("cookie", ""))
        if (scheme.lower() == "bearer" and self._is_token(credentials.strip())) or self._is_token(cookies.get(COOKIE)):
            await self.app(scope, receive, send)
            return
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = [v for k, v in query if k == "token"]
        if scope["method"] == "GET" and given and self._is_token(given[-1]):
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            path = "/" + scope["path"].lstrip("/")  # never //host/...: a browser would leave for that host
            response: Any = RedirectResponse(path + (f"?{rest}" if rest else ""), status_code=303)
            response.set_cookie(COOKIE, given[-1], httponly=True, samesite="strict", path="/")
        else:
            response = JSONResponse(
                {"detail": "this server needs its token: send the header 'Authorization: Bearer TOKEN', or open "
                           "/?token=TOKEN once in a browser"},
                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
