"""The web UI in a real browser: a person opens an app, types an input, clicks Run, and watches.

Debian's headless Chromium, driven through its chromedriver by Selenium (nothing is
downloaded), loads the pages from the real app on uvicorn; two workers execute the run in a
real sandbox. The test asserts what the page shows and what the store recorded (trigger
``ui``), and keeps a screenshot of the finished run page in its tmp_path.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from corral.api import ui
from corral.api.app import create_app
from corral.context import Corral
from corral.pipeline.apps import AppSpec
from corral.pipeline.worker import Worker
from tests.conftest import require
from tests.hosts import serving
from tests.integration.test_http_trigger import GREET_SCHEMA, agent_environment

pytestmark = [pytest.mark.root, pytest.mark.runc]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1200,1100",
)

# Untrusted input that the page must show as text, never run: the agent echoes it back.
HOSTILE = "<img src=x onerror=alert(1)><script>alert(2)</script>"


@pytest.fixture(scope="module")
def workers(corral: Corral) -> Iterator[list[Worker]]:
    started = corral.start_workers(2)
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def base_url(corral: Corral, workers: list[Worker]) -> Iterator[str]:
    with serving(create_app(corral)) as url:
        yield url


@pytest.fixture(scope="module")
def app(corral: Corral) -> Iterator[str]:
    env = agent_environment(corral)
    name = f"ui-{secrets.token_hex(4)}"
    corral.pipeline.apps.create(
        name, AppSpec(environment=env, entrypoint="agent.py:greet", input_schema=GREET_SCHEMA)
    )
    yield name
    corral.envs.delete(env)


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        require("chromium", "apt-get install chromium chromium-driver (scripts/install-deps.sh)")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def no_alert(driver: WebDriver) -> None:
    try:
        text = driver.switch_to.alert.text
    except NoAlertPresentException:
        return
    pytest.fail(f"the page ran injected script: alert({text!r})")


def test_click_run_and_watch_it_succeed(
    browser: WebDriver,
    base_url: str,
    app: str,
    corral: Corral,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = f"u-{secrets.token_hex(4)}"
    corral.ledger.grant(user, 100)
    wait = WebDriverWait(browser, 120, poll_frequency=0.1)

    browser.get(f"{base_url}/ui/")
    browser.find_element(By.LINK_TEXT, app).click()
    wait.until(lambda d: d.current_url.endswith(f"/ui/apps/{app}"))
    assert app in browser.find_element(By.TAG_NAME, "h1").text

    textarea = browser.find_element(By.ID, "input")
    prefilled = textarea.get_property("value")
    assert isinstance(prefilled, str), prefilled  # a textarea's value is its text
    assert json.loads(prefilled) == GREET_SCHEMA["examples"][0]
    textarea.clear()
    textarea.send_keys(json.dumps({"who": HOSTILE, "n": 4}))
    user_field = browser.find_element(By.ID, "user")
    user_field.clear()
    user_field.send_keys(user)
    browser.find_element(By.ID, "run-button").click()

    wait.until(lambda d: "/ui/runs/run-" in d.current_url)
    run_id = browser.current_url.rsplit("/", 1)[1]
    wait.until(lambda d: d.find_element(By.ID, "status").text == "succeeded")
    browser.save_screenshot(str(tmp_path / "run.png"))
    shown = json.loads(browser.find_element(By.ID, "result").text)
    assert shown == {"greeting": f"hello {HOSTILE}", "twice": 8}
    kinds = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#events li .kind")]
    assert kinds.index("runner.started") < kinds.index("result") < kinds.index("run.finished")
    assert "The run ended: succeeded." in browser.find_element(By.ID, "stream-state").text
    no_alert(browser)
    assert not browser.find_elements(By.CSS_SELECTOR, "main img, main script:not([nonce])")

    recorded = corral.store.runs.get(run_id)
    assert recorded.trigger == "ui" and recorded.user == user and recorded.app == app
    assert recorded.status == "succeeded" and json.loads(recorded.input)["who"] == HOSTILE

    # A kind the page has no listener for is not lost: the stream's end names it, and the
    # page follows the ended run's stream once more, listening for it too.
    monkeypatch.setattr(ui, "EVENT_KINDS", [k for k in ui.EVENT_KINDS if k != "log"])
    browser.get(f"{base_url}/ui/runs/{run_id}")
    wait.until(lambda d: "The run ended" in d.find_element(By.ID, "stream-state").text)
    replayed = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#events li .kind")]
    assert replayed == kinds

    # The app's page now lists the run, its hostile input still inert.
    browser.get(f"{base_url}/ui/apps/{app}")
    assert browser.find_element(By.LINK_TEXT, run_id)
    no_alert(browser)
    browser.save_screenshot(str(tmp_path / "app.png"))


def test_the_form_reports_what_it_refuses(browser: WebDriver, base_url: str, app: str) -> None:
    browser.get(f"{base_url}/ui/apps/{app}")
    problem = browser.find_element(By.ID, "form-error")
    textarea = browser.find_element(By.ID, "input")
    textarea.clear()
    textarea.send_keys("{not json")
    browser.find_element(By.ID, "run-button").click()
    assert "The input is not JSON" in problem.text

    textarea.clear()
    textarea.send_keys('{"n": 1}')  # fails the schema: "who" is required
    browser.find_element(By.ID, "run-button").click()
    WebDriverWait(browser, 30).until(lambda d: "invalid_input" in problem.text)
    assert "who" in problem.text and browser.current_url.endswith(f"/ui/apps/{app}")

    browser.get(f"{base_url}/ui/apps/no-such-app")
    assert "404 app_not_found" in browser.find_element(By.TAG_NAME, "h1").text
