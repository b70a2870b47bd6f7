"""The chat page at ``/`` in a real headless browser: Debian's chromium driven by selenium through
Debian's chromedriver (never selenium-manager: nothing is downloaded), against a real uvicorn on
127.0.0.1 serving the session's SmolLM2 engine with an API key.

The page is checked against the server's own API as an independent reference: what it streams
must equal the non-streamed answer to the same messages and settings. Screenshots go to
``$ROSENBLATT_TEST_ARTIFACTS`` (else ``tests/artifacts/``). Without chromium or chromedriver the
module is skipped, unless ``CI`` is set (CI installs both; a skip there would hide a broken page).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from support import serving, smollm2_path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MODEL_ID = smollm2_path().stem
KEY = "page-test-key"
ARTIFACTS = Path(os.environ.get("ROSENBLATT_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts")
#: what the page sends when its fields are as the test sets them (the reference asks the same)
SETTINGS = {"temperature": 0, "top_p": 0.95, "top_k": 40, "min_p": 0.05}
SYSTEM = "You are a helpful assistant. Answer briefly."

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def server(smollm2_engine):
    with serving(smollm2_engine, app_kw={"api_key": KEY}) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,860",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    # an explicit driver path: selenium-manager is never consulted (it would try to download)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        driver.set_window_size(1280, 860)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        yield driver
    finally:
        driver.quit()


# -- helpers ----------------------------------------------------------------------------------

def api_chat(server, messages, max_tokens, **settings) -> dict:
    """The independent reference: the same request, not streamed, straight to the API."""
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                   json={"messages": messages, "max_tokens": max_tokens, **SETTINGS, **settings})
    assert r.status_code == 200, r.text
    return r.json()


def health(server) -> dict:
    r = httpx.get(server.url + "/health", timeout=10)
    assert r.status_code == 200
    return r.json()


def wait_idle(server, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = health(server)
        if not h["busy"] and h["queued"] == 0 and h["running"] == 0:
            return h
        assert time.monotonic() < deadline, f"the worker stayed busy: {h}"
        time.sleep(0.05)


def by_testid(driver, testid: str):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def all_by_testid(driver, testid: str) -> list:
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')


def text(driver, el) -> str:
    """The element's text exactly (selenium's ``.text`` trims and folds whitespace)."""
    return driver.execute_script("return arguments[0].textContent", el)


def wait(driver, condition, timeout: float, message: str):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda d: condition(d), message)


def fill(driver, testid: str, value) -> None:
    el = by_testid(driver, testid)
    el.clear()
    if value != "":
        el.send_keys(str(value))


def set_settings(driver, system: str = "", max_tokens=64, **fields) -> None:
    fill(driver, "system-prompt", system)
    for name, value in {**SETTINGS, "max_tokens": max_tokens, "seed": "", **fields}.items():
        fill(driver, name, value)


def last_answer(driver):
    answers = all_by_testid(driver, "message-assistant")
    return answers[-1] if answers else None


def answer_text(driver) -> str:
    return text(driver, last_answer(driver).find_element("css selector", ".content"))


def answer_state(driver) -> str | None:
    a = last_answer(driver)
    return a.get_attribute("data-state") if a is not None else None


def ask(driver, question: str, enter: bool = True, answered: bool = True) -> None:
    from selenium.webdriver.common.keys import Keys
    n = len(all_by_testid(driver, "message-assistant"))
    box = by_testid(driver, "prompt")
    box.send_keys(question)
    if enter:
        box.send_keys(Keys.ENTER)
    else:
        by_testid(driver, "send").click()
    if answered:
        wait(driver, lambda d: len(all_by_testid(d, "message-assistant")) == n + 1, 10, "no answer bubble appeared")


def streamed_lengths(driver, timeout: float = 60.0) -> list[int]:
    """The answer's length, polled until it has finished (every distinct value seen)."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        a = last_answer(driver)
        n = len(text(driver, a.find_element("css selector", ".content")))
        if not seen or seen[-1] != n:
            seen.append(n)
        if a.get_attribute("data-state") in ("done", "stopped", "error"):
            return seen
        assert time.monotonic() < deadline, f"the answer did not finish within {timeout} s"
        time.sleep(0.01)


def shot(driver, name: str) -> Path:
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path)), f"no screenshot {path}"
    return path


def new_chat(driver) -> None:
    by_testid(driver, "new-chat").click()
    wait(driver, lambda d: not all_by_testid(d, "message-assistant") and not all_by_testid(d, "error"), 5,
         "New chat did not clear the conversation")


# -- the tests ---------------------------------------------------------------------------------

def test_page_loads_and_asks_for_the_key(server, browser):
    """The page and its files load without the key (the API does not), show the model's id from
    /health, ask for the key, and show the model's details once it is given; nothing is
    fetched from anywhere but the server."""
    for path in ("/", "/static/app.js", "/static/style.css"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200, path
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(server.url + "/props", timeout=10).status_code == 401
    page = httpx.get(server.url + "/", timeout=10)
    assert "default-src 'self'" in page.headers["content-security-policy"]

    browser.get(server.url + "/")
    wait(browser, lambda d: text(d, by_testid(d, "model-id")) == MODEL_ID, 15, "the model's id is not shown")
    wait(browser, lambda d: "API key" in text(d, by_testid(d, "model-details")), 15, "the page did not ask for the key")
    key = by_testid(browser, "api-key")
    key.send_keys(KEY)
    by_testid(browser, "prompt").click()               # leaving the field applies the key
    wait(browser, lambda d: "llama" in text(d, by_testid(d, "model-details")), 15, "no model details with the key")
    details = text(browser, by_testid(browser, "model-details"))
    assert all(part in details for part in ("134.5 M params", "Q4_1", "ctx 512", "cpu", "4 slots")), details
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(server.url + "/") for r in resources), resources


def test_answer_streams_and_equals_the_api(server, browser):
    """An answer (Enter sends; Shift+Enter is a new line) streams in growing pieces and ends
    equal to the API's non-streamed answer to the same messages and settings, system prompt
    included; the stats line has the API's token counts and a positive tokens/s. A second turn
    carries the conversation."""
    from selenium.webdriver.common.keys import Keys
    new_chat(browser)
    set_settings(browser, system=SYSTEM, max_tokens=64)
    box = by_testid(browser, "prompt")
    box.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "second line")
    assert box.get_attribute("value") == "first line\nsecond line" and not all_by_testid(browser, "message-user")
    box.clear()

    question = "What is the Eiffel Tower?"
    ask(browser, question)
    lengths = streamed_lengths(browser)
    answer = last_answer(browser)
    assert answer.get_attribute("data-state") == "done", text(browser, answer)
    assert len(lengths) >= 4 and lengths == sorted(lengths), f"the answer did not stream: {lengths}"
    got = text(browser, answer.find_element("css selector", ".content"))
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    ref = api_chat(server, messages, 64)
    assert got == ref["choices"][0]["message"]["content"] and got.strip()

    stats = answer.find_element("css selector", '[data-testid="stats"]')
    assert float(stats.get_attribute("data-tokens-per-second")) > 0
    assert "tokens/s" in text(browser, stats)
    assert int(stats.get_attribute("data-completion-tokens")) == ref["usage"]["completion_tokens"]
    # the system prompt was sent: the prompt's size is the reference's, not the template default's
    assert int(stats.get_attribute("data-prompt-tokens")) == ref["usage"]["prompt_tokens"]
    without = api_chat(server, messages[1:], 1)
    assert without["usage"]["prompt_tokens"] != ref["usage"]["prompt_tokens"]

    follow = "How tall is it?"
    ask(browser, follow, enter=False)                   # the Send button this time
    streamed_lengths(browser)
    second = last_answer(browser)
    assert second.get_attribute("data-state") == "done"
    messages += [{"role": "assistant", "content": got}, {"role": "user", "content": follow}]
    ref2 = api_chat(server, messages, 64)
    assert text(browser, second.find_element("css selector", ".content")) == ref2["choices"][0]["message"]["content"]
    assert [text(browser, m.find_element("css selector", ".content")) for m in all_by_testid(browser, "message-user")] \
        == [question, follow]
    shot(browser, "chat.png")
    toggle = by_testid(browser, "toggle-settings")
    try:
        browser.set_window_size(390, 844)               # a phone's width, the settings folded away
        toggle.click()
        wait(browser, lambda d: not by_testid(d, "settings").is_displayed(), 5, "the settings did not fold")
        shot(browser, "chat-phone.png")
    finally:
        browser.set_window_size(1280, 860)
        if toggle.get_attribute("aria-expanded") != "true":
            toggle.click()


def test_stop_cancels_the_generation(server, browser):
    """Stop ends a long answer mid-way: the text stops growing, the server cancels the
    generation (no running job soon after, one more cancelled), the stats line says stopped."""
    new_chat(browser)
    set_settings(browser, max_tokens=480)
    before = wait_idle(server)
    ask(browser, "Count from 1 to 500, one number per line.")
    wait(browser, lambda d: len(answer_text(d)) > 20 and answer_state(d) == "streaming", 30,
         "no text streamed")
    by_testid(browser, "stop").click()
    wait(browser, lambda d: answer_state(d) == "stopped", 10, "the answer did not stop")
    answer = last_answer(browser)
    content = answer.find_element("css selector", ".content")
    stopped_at = text(browser, content)
    after = wait_idle(server, timeout=10)
    assert after["cancelled"] == before["cancelled"] + 1 and after["served"] == before["served"], after
    assert after["last"]["finish_reason"] == "cancelled" and after["last"]["completion_tokens"] < 400, after
    time.sleep(0.5)
    assert text(browser, content) == stopped_at and len(stopped_at) > 20
    assert "stopped" in text(browser, answer.find_element("css selector", '[data-testid="stats"]'))
    assert by_testid(browser, "send").is_enabled() and not by_testid(browser, "stop").is_enabled()
    shot(browser, "stopped.png")


def test_server_error_is_shown(server, browser):
    """A request the server refuses shows its message; the question goes back into the box."""
    new_chat(browser)
    set_settings(browser, top_p=5)
    ask(browser, "Hello?", answered=False)
    wait(browser, lambda d: all_by_testid(d, "error"), 15, "no error shown")
    message = text(browser, by_testid(browser, "error"))
    assert "400" in message and "top_p" in message, message
    assert not all_by_testid(browser, "message-assistant")
    assert by_testid(browser, "prompt").get_attribute("value") == "Hello?"
    shot(browser, "error.png")
    set_settings(browser)
    by_testid(browser, "prompt").clear()
    wait_idle(server)


def test_busy_server_is_shown(smollm2_engine, browser):
    """A server that takes no more requests (503 queue_full) is one clear message with the
    server's words and its Retry-After."""
    with serving(smollm2_engine, app_kw={"max_queue": 0}) as busy:      # every request is refused
        browser.get(busy.url + "/")
        wait(browser, lambda d: text(d, by_testid(d, "model-id")) == MODEL_ID, 15, "the model's id is not shown")
        ask(browser, "Are you there?", answered=False)
        wait(browser, lambda d: all_by_testid(d, "error"), 15, "no error shown")
        message = text(browser, by_testid(browser, "error"))
        assert "503" in message and "too many requests waiting" in message and "retry after" in message, message
        shot(browser, "busy.png")
