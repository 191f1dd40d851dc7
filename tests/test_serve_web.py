"""The web page of `monkey serve` in a real headless Chromium (the system's, driven by Selenium through its
chromedriver): upload a sample PDF, see its pages, ask, watch the answers stream in next to their pages, copy
the JSON; no console errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import SAMPLES_DIR
from serve_helpers import LiveServer

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
def browser(tmp_path_factory):
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
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("ready"))
    browser.find_element(By.ID, "file").send_keys(str(SAMPLES_DIR / "report.pdf"))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pages figure img")) == 3)  # its pages, shown
    browser.find_element(By.ID, "questions").send_keys(QUESTION)
    browser.execute_script(COUNT_PIECES)
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: not d.find_element(By.ID, "json-box").get_property("hidden"))

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
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    assert errors == [], errors


def test_the_page_is_served_from_the_package_with_a_strict_policy(server) -> None:
    page = httpx.get(f"{server.base}/", timeout=30)
    assert page.status_code == 200 and "<script src=\"/static/app.js\"" in page.text
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "http" not in page.text.replace(f"{server.base}", ""), "the page must load nothing from elsewhere"
    for asset in ("app.js", "style.css"):
        assert httpx.get(f"{server.base}/static/{asset}", timeout=30).status_code == 200
