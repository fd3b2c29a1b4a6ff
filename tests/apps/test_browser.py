"""Both apps in a real browser: each started with `streamlit run` on localhost, opened in headless Chromium
(Debian's `chromium` and `chromium-driver`, driven by Selenium) once per prior, Sample / Inpaint pressed, the
result image waited for and its size checked, and a screenshot saved per app and prior.

Screenshots go to `$LDM_APP_SCREENSHOTS` (default: this test's temporary folder, printed). `$LDM_APP_CHECKPOINTS`
(`name=path,name=path`) puts other checkpoints in place of the tiny random ones, e.g. trained priors for the
README's pictures. Without Chromium the test is skipped, and says why.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.apps.conftest import PRIORS

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
SKIP = "Chromium not found: `apt-get install chromium chromium-driver` to run the apps' browser test" \
    if not (CHROMIUM and DRIVER) else None
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")
WAIT = 240  # seconds for a page to sample (tiny priors take seconds; trained ones, for pictures, longer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(script: str, sources: list[str], log: Path) -> Iterator[str]:
    """`streamlit run scripts/<script> -- <sources>` on a free localhost port; its address once healthy."""
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "scripts" / script), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false", "--", *sources]
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                pytest.fail(f"streamlit did not start ({script}): {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[apps]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,1000", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


RESULT = """
    const captions = [...document.querySelectorAll("[data-testid='stMain'] [data-testid='stImageCaption']")]
        .filter(c => c.textContent.includes("nearest neighbour"));
    if (!captions.length) return null;
    const img = captions[captions.length - 1].parentElement.querySelector("img");
    if (!img || !img.complete || !img.naturalWidth) return null;
    return {natural: [img.naturalWidth, img.naturalHeight], shown: [img.width, img.height],
            caption: captions[captions.length - 1].textContent};"""


def press_and_wait(driver, url: str, label: str) -> dict:
    """Open `url`, press the button `label` once the page is drawn, wait for the result image (the one captioned
    with its enlargement) to load; its natural and shown size."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, WAIT)
    button = wait.until(EC.element_to_be_clickable((By.XPATH, f"//button[normalize-space()='{label}']")))
    wait.until(EC.presence_of_element_located((By.XPATH, "//*[contains(text(), 'Sampler options')]")))
    button.click()
    found = wait.until(lambda d: d.execute_script(RESULT))
    wait.until(EC.presence_of_element_located((By.XPATH, "//button[contains(., 'Download every image')]")))
    time.sleep(0.3)  # the rest of the page (the command line) is drawn
    return found


def checkpoints(checkpoint, names: tuple[str, ...]) -> dict[str, str]:
    """The prior checkpoints to show: those `$LDM_APP_CHECKPOINTS` names, tiny random ones for the rest."""
    given = dict(item.split("=", 1) for item in os.environ.get("LDM_APP_CHECKPOINTS", "").split(",") if item)
    return {name: given.get(name) or checkpoint(name) for name in names}


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("LDM_APP_SCREENSHOTS") or tmp_path_factory.mktemp("app_screenshots"))  # noqa: B008
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def grid(count: int, nrow: int, side: int) -> tuple[int, int]:
    """The size of torchvision's grid of `count` images of `side` pixels, `nrow` a row, padding 2."""
    rows = -(-count // nrow)
    return 2 + nrow * (side + 2), 2 + rows * (side + 2)


def check_size(found: dict, expected: tuple[int, int]) -> None:
    w, h = found["natural"]
    factor = w // expected[0]
    assert factor >= 1 and (w, h) == (expected[0] * factor, expected[1] * factor), (found, expected)
    assert found["shown"][0] > 0 and found["shown"][1] > 0


QUICK = ("absorbing", "imagebart", "ldm_text")  # a token prior, per-scale options, a text prompt


@pytest.mark.parametrize("names", [pytest.param(QUICK, id="three-priors"),
                                   pytest.param(tuple(PRIORS), id="every-prior", marks=pytest.mark.slow)])
def test_apps_in_a_browser(names, browser, checkpoint, shots, tmp_path, capsys):
    from ldm.apps.core import load

    priors = checkpoints(checkpoint, names)
    opened = {name: load(path) for name, path in priors.items()}  # what each page should show
    with served("sample_app.py", list(priors.values()), tmp_path / "sample_app.log") as url:
        for name, path in priors.items():
            found = press_and_wait(browser, f"{url}/?checkpoint={quote(path)}&batch_size=2&seed=1", "Sample")
            classes = opened[name].prior.num_classes or 0  # a class prior samples a row per class
            check_size(found, grid(2 * classes or 2, 2 if classes else 1, opened[name].image_shape[1]))
            browser.save_screenshot(str(shots / f"sample_{name}.png"))
    with served("inpaint_app.py", list(priors.values()), tmp_path / "inpaint_app.log") as url:
        for name, path in priors.items():
            found = press_and_wait(browser, f"{url}/?checkpoint={quote(path)}&source=validation&count=4&samples=2"
                                            "&seed=1", "Inpaint")
            check_size(found, grid(4 * 4, 4, opened[name].image_shape[1]))  # images, masked, 2 completions; 4 a row
            browser.save_screenshot(str(shots / f"inpaint_{name}.png"))
    with capsys.disabled():
        print(f"\napp screenshots: {shots} ({2 * len(priors)} files)")
