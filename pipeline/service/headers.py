"""Security headers on every answer of the query service.

The viewer shows text from mosaics and model bundles (class names, ids) that whoever wrote them chose;
the pages build it as text, never as HTML, and the Content-Security-Policy stops script that slipped
through anyway: scripts only from this origin's files (no inline script, no eval), nothing fetched
from other origins (an offline cluster reaches none, and a page may not leak to one), and no page of
the service framed by another site.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import MutableHeaders

# What the pages load, all same-origin: /static (viewer), /vendor/leaflet (Leaflet's script, CSS and
# its control images), /vendor/swagger-ui (/docs), the JSON API and the tiles. Leaflet and Swagger UI
# set styles through the CSSOM (element.style), which style-src does not govern; Swagger UI's CSS
# draws its icons as data: SVG images.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "font-src 'self'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",  # a tile or a JSON answer is never run as script or HTML
    "Referrer-Policy": "no-referrer",  # mosaic names in URLs stay on the cluster
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
}


class SecurityHeaders:
    """ASGI middleware: adds `headers` to every HTTP answer that does not set them itself."""

    def __init__(self, app: Any, headers: dict[str, str] | None = None) -> None:
        self.app = app
        self.headers = SECURITY_HEADERS if headers is None else headers

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
