"""The web page of `monkey serve` in a real headless Chromium (the system's, driven by Selenium through its
chromedriver): upload a sample PDF, see its pages, enlarge one, ask, watch the answers stream in next to their
pages, copy and download the JSON and the Markdown; a file that is no document disables Ask; Stop cancels a
long answer and the server frees its slot; the status line speaks plain words; no console errors (the page
works under its Content-Security-Policy)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import SAMPLES_DIR
from serve_helpers import LiveServer, data_url, image_message

QUESTION = "What is the title?"
pytestmark = pytest.mark.slow

# Counts the text pieces added to answers while they stream (before each is replaced by its final record).
COUNT_PIECES = """
window.pieces = 0;
new MutationObserver((changes) => {
  for (const change of changes) {
    if (change.target.classList && change.target.classList.contains("text")) window.pieces += change.addedNodes.length;
  }
}).observe(document.getElementById("answers"), { childList: true, subtree: true });
"""


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    reason = "Chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true requires them")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_sharp_dir: Path):
    live = LiveServer(tmp_path_factory.mktemp("serve-web"), "--model", str(tiny_sharp_dir), "--max-new-tokens", "10")
    try:
        yield live.start()
    finally:
        live.stop()


@pytest.fixture(scope="module")
def long_server(tmp_path_factory, tiny_sharp_dir: Path):
    """One decode slot and answers of up to 6000 tokens (chart.png's answer runs that long: see
    test_serve_limits.test_a_long_answer_runs_long): a Stop in the middle of one can be seen server-side."""
    live = LiveServer(tmp_path_factory.mktemp("serve-web-long"), "--model", str(tiny_sharp_dir),
                      "--max-new-tokens", "6000", "--batch-size", "1")  # fmt: skip
    try:
        yield live.start()
    finally:
        live.stop()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(tmp_path_factory, downloads: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tmp_path_factory.mktemp("chromium-profile")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", "--no-first-run", f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.set_page_load_timeout(60)
        driver.set_script_timeout(60)
        yield driver
    finally:
        driver.quit()


def test_the_page_answers_questions_about_a_pdf(server, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(f"{server.base}/")
    wait.until(lambda d: _status(d) == "Ready: drop a PDF or an image to begin.")
    assert "tiny-monkey-sharp on the CPU" in browser.find_element(By.ID, "model").text
    browser.find_element(By.ID, "file").send_keys(str(SAMPLES_DIR / "report.pdf"))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pages figure img")) == 3)  # its pages, shown
    wait.until(lambda d: _status(d) == "Ready to ask about report.pdf (3 pages).")
    browser.find_element(By.ID, "questions").send_keys(QUESTION)
    browser.execute_script(COUNT_PIECES)
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: not d.find_element(By.ID, "json-box").get_property("hidden"))
    assert re.fullmatch(r"Done: 3 answers, in \d+\.\d s\.", _status(browser)), _status(browser)

    document = json.loads(browser.find_element(By.ID, "json").get_property("textContent"))
    cards = browser.find_elements(By.CSS_SELECTOR, "#answers .answer.done")
    assert len(cards) == len(document["records"]) == 3
    for card, record in zip(cards, document["records"], strict=True):
        assert card.get_attribute("data-page") == str(record["page"])
        assert card.find_element(By.CSS_SELECTOR, ".prompt").text == QUESTION
        assert card.find_element(By.CSS_SELECTOR, ".text").get_property("textContent") == record["answer"]
        page_image = card.find_element(By.CSS_SELECTOR, "figure img")  # the page the answer is about, beside it
        assert page_image.get_attribute("src").startswith("data:image/jpeg;base64,")
        assert page_image.get_property("naturalWidth") > 0
    assert browser.execute_script("return window.pieces") > len(cards), "the answers did not stream in"

    # The JSON is the API's (and the CLI's) document.
    files = {"file": ("report.pdf", (SAMPLES_DIR / "report.pdf").read_bytes())}
    api = httpx.post(f"{server.base}/v1/documents", files=files, data={"question": QUESTION}, timeout=300).json()
    assert [r["answer"] for r in api["records"]] == [r["answer"] for r in document["records"]]

    browser.find_element(By.ID, "copy").click()
    wait.until(lambda d: d.find_element(By.ID, "copied").text)
    _no_console_errors(browser)


def test_the_page_downloads_the_clis_json_and_markdown(server, browser, downloads) -> None:
    """After an answer: Download JSON saves exactly the document shown (the CLI's --format json text) as
    report.pdf.json, Download Markdown what --format md prints for those records as report.pdf.md."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from monkey_cli.output import SCHEMA_VERSION, Record, render

    wait = WebDriverWait(browser, 120)
    _ask_about_report(browser, server, wait)
    shown = browser.find_element(By.ID, "json").get_property("textContent")
    browser.find_element(By.ID, "download-json").click()
    browser.find_element(By.ID, "download-md").click()
    saved_json, saved_md = downloads / "report.pdf.json", downloads / "report.pdf.md"
    wait.until(lambda d: saved_json.is_file() and saved_md.is_file())
    wait.until(lambda d: saved_json.read_text(encoding="utf-8") == shown)  # complete, and the very text shown
    document = json.loads(shown)
    assert document["schema_version"] == SCHEMA_VERSION and len(document["records"]) == 3
    records = [Record.from_dict(record) for record in document["records"]]
    wait.until(lambda d: saved_md.read_text(encoding="utf-8") == render(records, "md"))
    assert saved_md.read_text(encoding="utf-8").startswith("# monkey-cli results")
    _no_console_errors(browser)


def test_a_page_is_enlarged_on_a_click(server, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    _ask_about_report(browser, server, wait, ask=False)
    thumbnail = browser.find_elements(By.CSS_SELECTOR, "#pages figure img")[1]
    shown_width = thumbnail.size["width"]
    thumbnail.click()
    viewer = browser.find_element(By.ID, "viewer")
    wait.until(lambda d: viewer.get_property("open"))
    large = browser.find_element(By.ID, "viewer-image")
    assert large.get_attribute("src") == thumbnail.get_attribute("src")  # the same page
    assert large.size["width"] >= 3 * shown_width, (large.size, shown_width)
    assert browser.find_element(By.ID, "viewer-caption").text == "report.pdf · page 2 of 3"
    browser.find_element(By.ID, "viewer-close").click()
    wait.until(lambda d: not viewer.get_property("open"))
    _no_console_errors(browser)


def test_a_file_that_is_no_document_disables_ask(server, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(f"{server.base}/")
    wait.until(lambda d: _status(d).startswith("Ready"))
    notes = tmp_path / "notes.txt"
    notes.write_text("just some text, not a document\n")
    browser.find_element(By.ID, "questions").send_keys(QUESTION)
    browser.find_element(By.ID, "file").send_keys(str(notes))
    wait.until(lambda d: _status(d).startswith("notes.txt cannot be used: "))
    assert browser.find_element(By.ID, "run").get_property("disabled")
    assert browser.find_element(By.ID, "error").text  # why, in the server's words
    browser.find_element(By.ID, "file").send_keys(str(SAMPLES_DIR / "chart.png"))  # a usable one enables it again
    wait.until(lambda d: not d.find_element(By.ID, "run").get_property("disabled"))
    assert _status(browser) == "Ready to ask about chart.png (1 page)."
    _no_console_errors(browser, expected="/v1/documents/preview - Failed to load resource: the server responded "
                       "with a status of 400")  # the refusal itself, which the browser always logs  # fmt: skip


def test_stop_cancels_the_answer_and_the_server_frees_its_slot(long_server, browser) -> None:
    """A 6000-token answer on a server with one decode slot, stopped once it streams: the page says so, the
    server stops decoding it at once (far fewer tokens decoded, nothing pending) and its one slot serves the
    next request."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    before = long_server.health()["engine"]["decoded_tokens"]
    browser.get(f"{long_server.base}/")
    wait.until(lambda d: _status(d).startswith("Ready"))
    browser.find_element(By.ID, "file").send_keys(str(SAMPLES_DIR / "chart.png"))
    wait.until(lambda d: not d.find_element(By.ID, "run").get_property("disabled"))
    browser.find_element(By.ID, "questions").send_keys(QUESTION)
    browser.execute_script(COUNT_PIECES)
    assert browser.find_element(By.ID, "stop").get_property("hidden")
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.execute_script("return window.pieces") > 0)  # the answer is streaming
    assert long_server.health()["pending"] == 1
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda d: _status(d).startswith("Stopped"))
    assert _status(browser) == "Stopped after 0 of 1 answer; the server dropped the rest."
    assert browser.find_element(By.CSS_SELECTOR, "#answers .answer.stopped .meta").text == "stopped"
    deadline = time.monotonic() + 10
    while (health := long_server.health())["pending"] or health["requests"]:
        assert time.monotonic() < deadline, f"the stopped request still runs: {health}"
        time.sleep(0.05)
    decoded = long_server.health()["engine"]["decoded_tokens"] - before
    assert decoded < 1000, decoded  # it would have run to 6000
    assert not browser.find_element(By.ID, "run").get_property("disabled")
    assert browser.find_element(By.ID, "stop").get_property("hidden")
    # The one slot is free: the next request is answered at once.
    body = {"model": "m", "max_tokens": 3,
            "messages": [image_message(data_url(SAMPLES_DIR / "chart.png"), QUESTION)]}  # fmt: skip
    reply = httpx.post(f"{long_server.base}/v1/chat/completions", json=body, timeout=60).json()
    assert reply["usage"]["completion_tokens"] == 3
    assert "POST /v1/documents 200 " in long_server.log()  # the access log's line for it
    _no_console_errors(browser)


def _status(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "status").text


def _ask_about_report(browser, server, wait, ask: bool = True) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{server.base}/")
    wait.until(lambda d: _status(d).startswith("Ready"))
    browser.find_element(By.ID, "file").send_keys(str(SAMPLES_DIR / "report.pdf"))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pages figure img")) == 3)
    if ask:
        wait.until(lambda d: not d.find_element(By.ID, "run").get_property("disabled"))
        browser.find_element(By.ID, "questions").send_keys(QUESTION)
        browser.find_element(By.ID, "run").click()
        wait.until(lambda d: not d.find_element(By.ID, "json-box").get_property("hidden"))


def _no_console_errors(browser, expected: str | None = None) -> None:
    """Nothing the page did was refused (a CSP violation is a console error) or failed, but the `expected`
    (the log is read, and emptied, here)."""
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    unexpected = [entry for entry in errors if expected is None or expected not in entry["message"]]
    assert unexpected == [], unexpected
    if expected is not None:
        assert errors, f"expected a console line with {expected!r}"


def test_the_page_is_served_from_the_package_with_a_strict_policy(server) -> None:
    page = httpx.get(f"{server.base}/", timeout=30)
    assert page.status_code == 200 and "<script src=\"/static/app.js\"" in page.text
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "http" not in page.text.replace(f"{server.base}", ""), "the page must load nothing from elsewhere"
    for asset in ("app.js", "style.css"):
        assert httpx.get(f"{server.base}/static/{asset}", timeout=30).status_code == 200
