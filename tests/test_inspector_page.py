"""The inspector page in a real browser: headless Chromium (Debian's `chromium`) driven by Selenium through
Debian's `chromium-driver`, against a real station (shadow mode, a folder of frames: every part is queued)
served by uvicorn. The inspector logs in with the inspector token, labels parts by keyboard, sees the counts
change, and the labels are in the review store with the labeller. A screenshot is saved in the test's folder
and copied to artifacts/inspector-page.png.

Skips with the reason where chromium or chromedriver is not installed (`make test` installs them as root).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.runtime import Station, build_station
from tests.support.frames import write_frames
from tests.support.settings import station_settings
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "artifacts" / "inspector-page.png"
TOKENS = {"line_pc": "line-pc-0123456789abcdef", "inspector": "inspector-0123456789abcdef",
          "admin": "admin-0123456789abcdef0123"}
PARTS = 5
LABELLER = "A. Schmidt"
CHROMIUM_HINT = "install the Debian packages: apt-get install chromium chromium-driver (make test does it as root)"


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _find("chromium", "chromium-browser")
CHROMEDRIVER = _find("chromedriver") or ("/usr/lib/chromium/chromedriver"
                                         if os.access("/usr/lib/chromium/chromedriver", os.X_OK) else None)

pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason=f"chromium or chromedriver not installed: {CHROMIUM_HINT}")


@pytest.fixture
def browser() -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def station(tmp_path: Path, bundle_dir: Path) -> Iterator[Station]:
    frames = write_frames(tmp_path / "frames", PARTS)
    station = build_station(station_settings(tmp_path, bundle_dir, source=frames, decision={"mode": "shadow"},
                                             http={"enabled": True, "port": 0, "tokens": TOKENS}))
    station.start()
    try:
        assert wait_until(lambda: len(station.review.store.items()) == PARTS, 60), "the parts were not queued"
        yield station
    finally:
        station.pipeline.stop()
        assert station.pipeline.join(30)
        station.stop_http()
        station.close()


def test_an_inspector_labels_three_parts_by_keyboard_and_sees_the_counts_change(station: Station, browser,
                                                                                  tmp_path: Path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = browser
    base = f"http://127.0.0.1:{station.http.server.port}"

    def text(element_id: str) -> str:
        return driver.find_element(By.ID, element_id).text

    def shown() -> str | None:
        part = driver.find_element(By.ID, "part")
        return part.get_attribute("data-inspection-id") if part.is_displayed() else None

    def picture_loaded(overlay: str) -> bool:
        img = driver.find_element(By.ID, "picture")
        return bool(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)) \
            and img.get_attribute("data-overlay") == overlay

    def press(key: str) -> None:
        ActionChains(driver).send_keys(key).perform()

    # the page, from the station's address; a login form first
    driver.get(base + "/")
    assert driver.current_url == base + "/inspector"
    assert wait_until(lambda: driver.find_element(By.ID, "token").is_displayed(), 10)
    assert not driver.find_element(By.ID, "review").is_displayed()

    # a line PC's token may not review: refused with the reason, still on the login form
    driver.find_element(By.ID, "token").send_keys(TOKENS["line_pc"])
    driver.find_element(By.ID, "login-button").click()
    assert wait_until(lambda: "needs inspector" in text("login-error"), 10), text("login-error")
    driver.get_log("browser")  # that 403 was expected: from here on the console stays clean

    driver.find_element(By.ID, "token").send_keys(TOKENS["inspector"])
    driver.find_element(By.ID, "labeller").send_keys(LABELLER)
    driver.find_element(By.ID, "login-button").click()
    assert wait_until(lambda: shown() is not None, 15), text("error") or text("login-error")
    assert wait_until(lambda: text("count-queued") == str(PARTS) and text("count-labelled") == "0", 10)
    assert text("count-unlabelled") == str(PARTS) and text("count-agreement") == "–"
    # the token: in this tab's sessionStorage, never in a URL
    assert driver.execute_script("return sessionStorage.getItem('inspector.token')") == TOKENS["inspector"]
    assert TOKENS["inspector"] not in driver.current_url

    # the oldest unlabelled part, with its AI verdict, score and heat map overlay
    items = station.review.store.items()
    assert shown() == items[0].inspection_id
    assert text("part-id") == items[0].part_id and text("ai-verdict") == items[0].ai_verdict
    assert text("score") == f"{items[0].score:.3f}" and text("queue-reason") == "shadow"
    assert wait_until(lambda: picture_loaded("defect_map"), 10)
    press("h")  # the heat map off, and on again
    assert wait_until(lambda: picture_loaded("none"), 10)
    press("h")
    assert wait_until(lambda: picture_loaded("defect_map"), 10)

    # 1: pass
    first = shown()
    press("p")
    assert wait_until(lambda: text("count-labelled") == "1" and shown() not in (None, first), 10), text("error")
    assert text("count-unlabelled") == str(PARTS - 1) and text("count-agreement") != "–"
    assert f"by {LABELLER}" in text("last-label") and "pass" in text("last-label")
    # 2: fail, defect type crack (key 1)
    second = shown()
    press("1")
    assert driver.find_element(By.ID, "defect-type").get_attribute("value") == "crack"
    press("f")
    assert wait_until(lambda: text("count-labelled") == "2" and shown() not in (None, second), 10), text("error")
    assert "fail (crack)" in text("last-label")
    # skip one: nothing recorded, the next part shown
    skipped = shown()
    press("s")
    assert wait_until(lambda: shown() not in (None, skipped), 10)
    assert text("count-labelled") == "2"
    # 3: pass
    third = shown()
    press("p")
    assert wait_until(lambda: text("count-labelled") == "3" and text("count-unlabelled") == str(PARTS - 3), 10)
    assert wait_until(lambda: shown() not in (None, third) and picture_loaded("defect_map"), 10)

    driver.save_screenshot(str(tmp_path / "inspector-page.png"))
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "inspector-page.png", SCREENSHOT)
    assert SCREENSHOT.stat().st_size > 10_000

    # the labels, in the review store, by the labeller, from the page (source http); the skipped part has none
    labels = station.review.store.labels()
    assert [(x.inspection_id, x.verdict, x.defect_type) for x in labels] == [
        (first, "pass", None), (second, "fail", "crack"), (third, "pass", None)]
    assert {(x.labeller, x.source) for x in labels} == {(LABELLER, "http")}
    assert all(x.message_id and x.message_id.startswith("web-") for x in labels)
    assert station.review.store.labels(skipped) == []
    # nothing the page did broke its content security policy or failed
    problems = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not problems, problems
