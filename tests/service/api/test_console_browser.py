"""The web console in a real browser: Debian's headless Chromium driven by Selenium through Debian's
chromedriver (no browser download), against ``ssf-serve`` under uvicorn with a tiny real backbone.

Load the console (only its own files), see the task list, classify an image and get the native route's
top label and version, upload a task with the token, and see the errors for a wrong token and for a file
that is not an image. ``SSF_CONSOLE_SCREENSHOT=path`` saves the page (how docs/console.png was made)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import ssf
from tests.helpers.api import TOKEN
from tests.helpers.deltas import make_delta, make_task, task_delta
from tests.helpers.images import encode
from tests.helpers.models import FAMILY_VIT, MODEL, backbone_file
from tests.helpers.servers import Server, start, stop, upload

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs Debian's chromium and chromium-driver (make system-deps installs them)",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e .[dev] (selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("console")
    s = start(tmp, backbone_file("vit", tmp))
    labels = ["tabby", "siamese", "persian", "sphynx"]
    tuned = make_task(FAMILY_VIT, 1, num_classes=4)
    cats = make_delta(tuned, "cats", MODEL, labels=labels, metrics={"val_acc": 0.91})
    assert upload(s.url, ssf.delta_to_bytes(cats)).status_code == 201
    yield s
    stop(s)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()


def wait_text(driver, element_id: str, words: str, timeout: float = 60) -> str:  # type: ignore[no-untyped-def]
    WebDriverWait(driver, timeout).until(ec.text_to_be_present_in_element((By.ID, element_id), words))
    text: str = driver.find_element(By.ID, element_id).text
    return text


def test_console_end_to_end(server: Server, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = browser
    d.get(server.url + "/console")
    wait_text(d, "tasks", "cats")
    assert "91.0% (val_acc)" in d.find_element(By.CSS_SELECTOR, "tr[data-task='cats']").text
    assert "test_vit" in wait_text(d, "backbone", "Backbone")
    origins = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert origins and all(o.startswith(server.url) for o in origins), origins  # nothing from elsewhere

    # classify: the top label and version the native route gives for the same file
    image = tmp_path / "photo.png"
    image.write_bytes(encode("PNG", 21, (64, 48)))
    native = httpx.post(
        f"{server.url}/tasks/cats/predict", content=image.read_bytes(), headers={"Content-Type": "image/png"}
    ).json()
    d.find_element(By.XPATH, "//button[text()='Classify with cats']").click()
    assert d.switch_to.active_element.get_attribute("id") == "image-file"  # keyboard users land on it
    d.find_element(By.ID, "image-file").send_keys(str(image))
    assert f"version {native['version']} answered" in wait_text(d, "answer", "answered")
    bars = d.find_elements(By.CSS_SELECTOR, "#bars li")
    assert len(bars) == min(5, 4)
    assert bars[0].find_element(By.TAG_NAME, "span").text == native["predictions"][0][0]["label"]

    # a file that is not an image: the server's message, shown as an alert
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image at all")
    d.find_element(By.ID, "image-file").send_keys(str(text_file))
    assert "400 bad_image" in wait_text(d, "error", "Could not classify notes.png")

    # upload with a wrong token, then the right one
    delta = tmp_path / "dogs.safetensors"
    delta.write_bytes(task_delta("dogs", 2))
    d.find_element(By.ID, "token").send_keys("wrong-token")
    d.find_element(By.ID, "delta-file").send_keys(str(delta))
    d.find_element(By.CSS_SELECTOR, "#upload button[type=submit]").click()
    assert "403 invalid_token" in wait_text(d, "error", "Upload failed")
    assert httpx.get(f"{server.url}/tasks/dogs").status_code == 404
    d.find_element(By.ID, "token").clear()
    d.find_element(By.ID, "token").send_keys(TOKEN)
    d.find_element(By.CSS_SELECTOR, "#upload button[type=submit]").click()
    assert "Uploaded dogs, version 1" in wait_text(d, "status", "Uploaded")
    wait_text(d, "tasks", "dogs")
    # traffic: the native request and the console's one image (the refused file is not counted)
    served = d.find_element(By.CSS_SELECTOR, "tr[data-task='cats'] td:nth-child(6)").text
    assert served == "2", served
    assert httpx.get(f"{server.url}/tasks/dogs").json()["version"] == 1
    # replace: the same file under the name cats, as a new version
    d.find_element(By.ID, "delta-name").send_keys("cats")
    d.find_element(By.ID, "replace").click()
    d.find_element(By.CSS_SELECTOR, "#upload button[type=submit]").click()
    assert "Uploaded cats, version 2" in wait_text(d, "status", "Uploaded cats")
    assert httpx.get(f"{server.url}/tasks/cats").json()["version"] == 2
    d.find_element(By.XPATH, "//button[text()='Delete dogs']").click()
    assert "Deleted dogs" in wait_text(d, "status", "Deleted")
    assert httpx.get(f"{server.url}/tasks/dogs").status_code == 404

    # every form control has a label
    for control in d.find_elements(By.CSS_SELECTOR, "input"):
        assert d.find_elements(By.CSS_SELECTOR, f"label[for='{control.get_attribute('id')}']"), control
    if os.environ.get("SSF_CONSOLE_SCREENSHOT"):  # docs/console.png (the cats row then shows version 2)
        d.find_element(By.XPATH, "//button[text()='Classify with cats']").click()
        d.find_element(By.ID, "image-file").send_keys(str(image))
        wait_text(d, "answer", "answered")
        d.save_screenshot(os.environ["SSF_CONSOLE_SCREENSHOT"])
