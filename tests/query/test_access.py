"""`tessera serve --token` and allowed Host names, against a real server: requests without the token get
401, the viewer works once opened with it, and a request naming another Host is refused."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.synthetic import write_label_mosaic
from tests.query.test_viewer import CHROMIUM, CHROMIUM_ARGS
from tests.servers.ports import http_answers, start_server

TOKEN = "s3cret-Token-for-the-test-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    root = tmp_path_factory.mktemp("guarded")
    labels = (np.arange(512)[:, None] // 64 + np.arange(512)[None, :] // 64) % 3
    write_label_mosaic(labels.astype(np.uint8), root / "scene.zarr", chunk=128, shard=256)
    # The token from the environment, as the docs advise (a command line is visible to other users).
    env = {**os.environ, "TESSERA_TOKEN": TOKEN}
    process, port = start_server(lambda port: subprocess.Popen(
        [str(Path(sys.executable).parent / "tessera"), "serve", str(root), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env),
        http_answers("/api/mosaics"))  # a 401 is an answer too
    yield "127.0.0.1", port
    process.terminate()
    output = process.communicate(timeout=20)[0]
    assert TOKEN not in output  # never printed


def ask(server: tuple[str, int], path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection(*server, timeout=30)
    connection.request("GET", path, headers=headers or {})
    answer = connection.getresponse()
    answer.read()
    return answer


def test_requests_without_the_token_get_401_and_with_it_are_answered(server: tuple[str, int]) -> None:
    for path in ("/api/mosaics", "/api/mosaics/scene.zarr/region.npy?window=0,0,8,8", "/", "/view/scene.zarr",
                 "/static/viewer.js", "/docs", "/openapi.json"):
        refused = ask(server, path)
        assert refused.status == 401 and refused.getheader("WWW-Authenticate") == "Bearer", path
    for wrong in ("Bearer nope", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN):
        assert ask(server, "/api/mosaics", {"Authorization": wrong}).status == 401, wrong
    assert ask(server, "/api/mosaics", {"Cookie": "tessera_token=nope"}).status == 401
    assert ask(server, "/api/mosaics?token=nope").status == 401

    answer = ask(server, "/api/mosaics", {"Authorization": f"Bearer {TOKEN}"})
    assert answer.status == 200
    assert ask(server, "/api/mosaics", {"Cookie": f"tessera_token={TOKEN}"}).status == 200


def test_a_link_with_the_token_sets_a_cookie_and_drops_the_token_from_the_address(server: tuple[str, int]) -> None:
    answer = ask(server, f"/view/scene.zarr?token={TOKEN}&x=1")
    assert answer.status == 303 and answer.getheader("Location") == "/view/scene.zarr?x=1"
    cookie = answer.getheader("Set-Cookie") or ""
    assert cookie.startswith(f"tessera_token={TOKEN}") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    # A path that starts with two slashes is redirected on this server, never to another host.
    assert ask(server, f"//evil.example/x?token={TOKEN}").getheader("Location") == "/evil.example/x"


def test_another_host_name_is_refused(server: tuple[str, int]) -> None:
    # DNS rebinding: a page on evil.example whose name now points at this address asks with its own Host.
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert ask(server, "/api/mosaics", {**bearer, "Host": "evil.example"}).status == 400
    assert ask(server, "/api/mosaics", {**bearer, "Host": f"localhost:{server[1]}"}).status == 200


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (`make test` installs it)")
def test_the_viewer_works_once_opened_with_the_token(server: tuple[str, int]) -> None:
    from playwright.sync_api import sync_playwright

    url = f"http://{server[0]}:{server[1]}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page()
        page.goto(f"{url}/view/scene.zarr")
        assert "needs its token" in page.inner_text("body")  # without it: the 401's message
        page.goto(f"{url}/view/scene.zarr?token={TOKEN}")
        assert page.url == f"{url}/view/scene.zarr"
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        # Functions, not bare expressions: Playwright runs those through eval, which the service's CSP blocks.
        page.wait_for_function(
            "() => document.querySelectorAll('img.leaflet-tile-loaded[src*=\"layer=mask\"]').length > 0",
            timeout=30_000)
        listing = page.evaluate("() => fetch('/api/mosaics').then((r) => r.json())")
        browser.close()
    assert [m["id"] for m in listing] == ["scene.zarr"]
    assert json.dumps(listing).count("scene.zarr") == 1
