"""Text from mosaics stays text: a class name written as HTML (`<img src=x onerror=...>`, as a shared
model bundle could carry) shows as those characters in the index and the viewer, and runs nothing.
Every answer carries the security headers, the Content-Security-Policy refuses inline script even if
a page did build HTML, and /docs works with no way out (Swagger UI served by the app itself)."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.classes import ClassInfo
from pipeline.service.headers import SECURITY_HEADERS
from pipeline.synthetic import write_label_mosaic
from tests.query.test_viewer import CHROMIUM, CHROMIUM_ARGS
from tests.servers.ports import http_answers, start_server

EVIL = "<img src=x onerror=alert(1)>"
SIZE = 512  # a slide-like mosaic, every pixel of class EVIL but a corner of "plain"

# Records every refusal of the Content-Security-Policy, from before any of the page's scripts run.
WATCH = """
window.__violations = [];
document.addEventListener("securitypolicyviolation",
    (e) => window.__violations.push(e.violatedDirective + " " + e.blockedURI));
"""

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason="Debian's chromium is not installed (`make test` installs it)")


@dataclass
class Server:
    url: str


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`tessera serve` on 127.0.0.1 over a folder with one mosaic whose first class name is HTML."""
    root = tmp_path_factory.mktemp("hostile")
    labels = np.zeros((SIZE, SIZE), np.uint8)
    labels[:64, :64] = 1
    classes = (ClassInfo(EVIL, (200, 40, 40)), ClassInfo("plain", (40, 40, 200)))
    write_label_mosaic(labels, root / "hostile.zarr", classes=classes, crs=None, transform=None, mpp=0.5,
                       chunk=128, shard=256)
    process, port = start_server(lambda port: subprocess.Popen(
        [str(Path(sys.executable).parent / "tessera"), "serve", str(root), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), http_answers("/api/mosaics"))
    url = f"http://127.0.0.1:{port}"
    yield Server(url)
    process.terminate()
    process.wait(timeout=20)


def get(url: str) -> tuple[int, Message, bytes]:
    """Status, headers (names in any case) and body of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.mark.parametrize(("path", "status", "kind"), [
    ("/api/mosaics/hostile.zarr", 200, "application/json"),
    ("/api/mosaics/hostile.zarr/tiles/0/0/0.png?layer=mask", 200, "image/png"),
    ("/view/hostile.zarr", 200, "text/html"),
    ("/", 200, "text/html"),
    ("/static/viewer.js", 200, "text/javascript"),
    ("/docs", 200, "text/html"),
    ("/api/mosaics/missing.zarr", 404, "application/json"),
])
def test_every_answer_carries_the_security_headers(server: Server, path: str, status: int, kind: str) -> None:
    code, headers, _ = get(server.url + path)
    assert (code, headers["content-type"].split(";")[0]) == (status, kind)
    for name, value in SECURITY_HEADERS.items():
        assert headers[name] == value, name
    policy = dict(d.strip().split(" ", 1) for d in headers["Content-Security-Policy"].split(";"))
    assert policy["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval', no other origin
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_docs_page_and_its_assets_come_from_the_app(server: Server) -> None:
    _, _, page = get(server.url + "/docs")
    html = page.decode()
    assert "<script>" not in html.replace(" ", "")  # only script files: the policy allows no inline one
    links = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(links) == 3
    for link in links:
        assert link.startswith("/") and not link.startswith("//"), link
        code, _, body = get(server.url + link)
        assert code == 200 and len(body) > 100, link
    assert "swagger" in get(server.url + "/vendor/swagger-ui/swagger-ui-bundle.js")[2][:2000].decode().lower()
    assert get(server.url + "/redoc")[0] == 404  # FastAPI's ReDoc page loads from a CDN: not served


def open_page(browser: Any, url: str) -> tuple[Any, list[str], list[str], list[str]]:
    """A page at `url` that records dialogs, script errors and requests to anything but `url`'s origin."""
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    dialogs: list[str] = []
    errors: list[str] = []
    outside: list[str] = []
    origin = re.match(r"https?://[^/]+", url).group(0)  # type: ignore[union-attr]

    def dialog(d: Any) -> None:
        dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", dialog)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: None if r.url.startswith((origin, "data:")) else outside.append(r.url))
    page.add_init_script(WATCH)
    page.goto(url)
    return page, dialogs, errors, outside


@pytest.mark.slow
@needs_chromium
def test_html_in_a_class_name_shows_as_text_and_runs_nothing(server: Server) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        # The index: the class name is a cell's text.
        page, dialogs, errors, outside = open_page(browser, server.url + "/")
        page.wait_for_selector("#mosaics tbody tr")
        assert page.locator("#mosaics tbody td").nth(3).inner_text() == f"{EVIL}, plain"
        assert page.locator("img").count() == 0
        assert page.evaluate("window.__violations") == []
        assert (dialogs, errors, outside) == ([], [], [])

        # The viewer: the legend, the panel and the popup of a click on a pixel of that class.
        page, dialogs, errors, outside = open_page(browser, server.url + "/view/hostile.zarr")
        page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        page.wait_for_function(
            "() => document.querySelectorAll('img.leaflet-tile-loaded[src*=\"layer=mask\"]').length > 0",
            timeout=30_000)
        assert page.locator("#legend li").all_inner_texts() == [EVIL, "plain"]
        point = page.evaluate(f"tessera.containerPoint({SIZE * 3 // 4}, {SIZE * 3 // 4})")
        box = page.locator("#map").bounding_box()
        assert box is not None
        page.mouse.click(box["x"] + point["x"], box["y"] + point["y"])
        page.wait_for_selector(".leaflet-popup-content", timeout=10_000)
        popup = page.locator(".leaflet-popup-content").inner_text()
        assert popup.startswith(EVIL + " (0.")
        assert page.locator("#info").inner_text().startswith(EVIL + "\n")
        assert page.evaluate("document.getElementById('info').dataset.name") == EVIL
        injected = "#panel img, .leaflet-popup img, img[src='x'], img[onerror]"
        assert page.locator(injected).count() == 0
        page.wait_for_timeout(300)  # an image's onerror fires after its failed load, not at once
        assert page.evaluate("window.__violations") == []  # the policy lets the viewer work as it is
        assert (dialogs, errors, outside) == ([], [], [])

        # Second line: had a page built HTML from a name, the policy refuses the inline handler.
        page.evaluate("document.getElementById('info').insertAdjacentHTML('beforeend',"
                      " '<img src=x onerror=\"window.__ran = true\">')")
        page.wait_for_function("() => window.__violations.length > 0", timeout=10_000)
        assert page.evaluate("window.__ran === undefined")
        assert any(v.startswith("script-src") for v in page.evaluate("window.__violations"))
        assert dialogs == []
        browser.close()


@pytest.mark.slow
@needs_chromium
def test_docs_page_works_with_no_way_out(server: Server) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page, dialogs, errors, outside = open_page(browser, server.url + "/docs")
        # Swagger UI has read /openapi.json and drawn one block per operation.
        page.wait_for_function("() => document.querySelectorAll('.opblock').length >= 8", timeout=30_000)
        assert "/api/mosaics/{mid}/point" in page.locator(".swagger-ui").inner_text()
        page.wait_for_timeout(300)
        assert page.evaluate("window.__violations") == []
        assert (dialogs, errors, outside) == ([], [], [])
        browser.close()
