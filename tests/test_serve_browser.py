"""The web page end to end in headless Chromium (Debian's ``chromium`` driven by ``playwright``): load the
page, translate, open a token's neighbours, add a memory pair and see the translation change."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from knnmt.apps.service import BatchConfig, ServeConfig, Service, create_app  # noqa: E402
from knnmt.hf.toy import toy_corpus  # noqa: E402

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium; .ci/run does)"
)
TOKEN = "browser-test-token"


@pytest.fixture
def server(marian: tuple[Any, Any], datastore: Any, tmp_path: Path) -> Iterator[str]:
    """The toy service on a free loopback port, served by uvicorn in a thread."""
    path = tmp_path / "ds"
    shutil.copytree(datastore.path, path)
    service = Service.open(
        marian, path, ServeConfig(token=TOKEN, batch=BatchConfig(max_wait_ms=1)), index=None
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning")
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert web.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        web.should_exit = True
        thread.join(30)
        service.close()


def test_page_translates_explains_and_learns(server: str, toy_pairs) -> None:
    known = {s for s, _ in toy_pairs}
    source, target = next(p for p in toy_corpus(300, seed=5) if p[0] not in known)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('meta').textContent.includes('entries')")
            page.fill("#source", source)
            page.fill("#k", "1")
            page.eval_on_selector(
                "#lambda", "el => { el.value = '1'; el.dispatchEvent(new Event('input')); }"
            )
            assert page.text_content("#lambda-value") == "1.00"
            page.click("#translate")
            page.wait_for_selector(".token")
            before = page.text_content(".translation-text")
            assert before and before != target

            page.click(".token >> nth=0")
            page.wait_for_selector("#details:not([hidden])")
            rows = page.locator("#neighbours tr")
            assert rows.count() == 1  # k = 1
            assert "→" in rows.nth(0).inner_text()
            assert page.locator("#bars-mt .bar").count() >= 1

            assert page.input_value("#mem-source") == source
            page.fill("#mem-target", target)
            page.fill("#mem-token", TOKEN)
            page.click("#mem-add")
            added = r"/^added as pair #\d+ \(\d+ entries\)\.$/"
            page.wait_for_function(f"document.getElementById('mem-status').textContent.match({added})")
            assert page.text_content(".translation-text") == target  # λ = 1, k = 1: the memory wins
            page.click(".token >> nth=0")
            assert "added" in page.locator("#neighbours tr").nth(0).inner_text()

            page.fill("#mem-token", "wrong-token")
            page.click("#mem-add")
            page.wait_for_function("document.getElementById('mem-status').textContent.startsWith('401')")
            assert not errors, errors
        finally:
            browser.close()
