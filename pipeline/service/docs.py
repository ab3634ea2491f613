"""The interactive API page, /docs: Swagger UI from the viewer's npm packages (swagger-ui-dist), not a
CDN, so that it works on a cluster with no way out. FastAPI's own page is turned off: it fetches its
script from a CDN and starts it with an inline script, which the service's Content-Security-Policy
refuses; this page starts it from a script file (static/docs.js)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response

VIEWER = Path(__file__).parent / "viewer"
SWAGGER_UI = VIEWER / "node_modules" / "swagger-ui-dist"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css")  # all the page needs of the package


def add_api_docs(app: FastAPI) -> None:
    """Serve /docs and its assets under /vendor/swagger-ui/ (the schema stays at app.openapi_url)."""

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        if not SWAGGER_UI.is_dir():
            return JSONResponse({"detail": "Swagger UI is not installed: run `npm ci` in pipeline/service/viewer "
                                           "(`make` does); the schema is at /openapi.json"}, status_code=404)
        return FileResponse(VIEWER / "docs.html")

    for name in ASSETS if SWAGGER_UI.is_dir() else ():
        def asset(path: Path = SWAGGER_UI / name) -> FileResponse:
            return FileResponse(path)

        app.add_api_route(f"/vendor/swagger-ui/{name}", asset, methods=["GET"], include_in_schema=False)
