"""The chat page in a real browser: Debian's headless Chromium (driven by Selenium with Debian's chromium-driver)
loads `/`, picks an image, asks, and sees the streamed answer — `generate`'s greedy text — then asks again about the
same image. Saves a screenshot (docs/serve_page.png is one)."""

import os
import shutil
import socket
import tempfile

import numpy as np
import pytest
from conftest import build_llava
from PIL import Image, ImageDraw

from bonsai_mlx.generate import generate, stream_generate
from bonsai_mlx.io import load
from bonsai_mlx.serve import Server

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:  # .ci/run installs both; a dev machine needs: apt-get install chromium chromium-driver
    raise ImportError("the page test needs Debian's chromium and chromium-driver (apt-get install chromium "
                      "chromium-driver)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}",
              "--window-size=420,860"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_the_page_streams_the_answer_and_asks_again_about_the_same_image(tmp_path, tokenizer, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d, _ = build_llava(tmp_path / "student", tokenizer, seed=7, noise=0.3)
    model, proc = load(d)
    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse([16, 16, 48, 48], fill=(220, 30, 30))
    path = tmp_path / "circle.png"
    img.save(path)
    q1, q2 = "What is in the picture?", "What colour is it?"
    first = generate(model, proc, q1, image=str(path), max_tokens=512).text
    ours = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q1}]},
            {"role": "assistant", "content": first}, {"role": "user", "content": q2}]
    second = "".join(s for s, _ in stream_generate(model, proc, messages=ours, image=str(path), max_tokens=512)
                     if s is not None)
    with Server((model, proc), port=free_port(), default_max_tokens=512) as server:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "file").send_keys(str(path))
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "preview").is_displayed())
        for n, (q, want) in enumerate(((q1, first), (q2, second)), start=1):
            browser.find_element(By.ID, "q").send_keys(q)
            browser.find_element(By.ID, "send").click()
            bubble = f"answer-{2 * n - 1}"  # the page numbers each answer by its place in the conversation

            def finished(b, bubble=bubble):
                el = b.find_element(By.ID, bubble)
                return el if el.get_attribute("data-done") else None

            answer = WebDriverWait(browser, 60).until(finished)
            assert answer.get_attribute("textContent") == want
            assert browser.find_element(By.ID, "status").text == "done"
        browser.save_screenshot(str(tmp_path / "page.png"))
        if os.environ.get("BONSAI_PAGE_SHOT"):  # how docs/serve_page.png was made
            shutil.copy(tmp_path / "page.png", os.environ["BONSAI_PAGE_SHOT"])
    shot = Image.open(tmp_path / "page.png")
    assert shot.size[0] > 300 and np.asarray(shot).std() > 5  # a rendered page, not a blank one
