"""The playground page (scripts/playground.py + playground.html) in a real browser: Debian's chromium driven by
Playwright, against the KServe front on the tiny model (the TorchServe side of the page is checked in
test_e2e_torchserve.py). Type a prompt, press Generate, the images appear with their seeds; a bad value shows the
server's message; the server's key never reaches the browser."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kserve_front import start_front
from query import wait_until_healthy
from ts_server import ROOT, free_ports

pytestmark = pytest.mark.e2e
KEY = "playground-test-key"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def playground(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("playground")
    with start_front(work, tiny_model_dir, api_key=KEY) as front:
        [port] = free_ports(1)
        with open(work / "playground.log", "w") as log:
            process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "playground.py"), "--front", "kserve",
                                        "--url", front.url, "--port", str(port)], stdout=log,
                                       stderr=subprocess.STDOUT, env=dict(os.environ, SD_API_KEY=KEY))
        try:
            wait_until_healthy(f"http://127.0.0.1:{port}/api/model", 60, process)
            yield f"http://127.0.0.1:{port}/"
        finally:
            process.terminate()
            process.wait(timeout=30)


def test_type_generate_see_the_images_and_an_error(playground):
    from playwright.sync_api import expect, sync_playwright

    if not Path(CHROMIUM).is_file():
        message = "no chromium (`make test` installs Debian's as root; or set CHROMIUM=/path/to/chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI runs as root: the test must run there
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 720})
        page.goto(playground)
        expect(page.locator("#size option")).to_have_count(3)  # the tiny model's full-speed sizes
        expect(page.locator("[data-lora]")).to_have_count(2)  # its adapters, style and detail
        page.fill("#prompt", "a red fox in the snow")
        page.fill("#steps", "2")
        page.fill("#seed", "7")
        page.fill("#n", "2")
        page.fill('[data-lora="style"]', "0.8")
        page.click("#generate")
        expect(page.locator("#results figure")).to_have_count(2, timeout=120_000)
        expect(page.locator("#results figcaption").first).to_have_text("seed 7 · 64×64")
        expect(page.locator("#results figcaption").nth(1)).to_have_text("seed 8 · 64×64")
        assert page.eval_on_selector("#results img", "img => img.naturalWidth") == 64
        expect(page.locator("#status")).to_contain_text("2 image(s) in")
        if os.environ.get("PLAYGROUND_SCREENSHOT"):  # how the README's picture is made
            page.screenshot(path=os.environ["PLAYGROUND_SCREENSHOT"])

        page.fill("#steps", "999")
        page.click("#generate")
        expect(page.locator("#error")).to_contain_text("num_inference_steps", timeout=60_000)
        expect(page.locator("#error")).to_contain_text("must be in 1..")
        assert KEY not in page.content()
        browser.close()


@pytest.mark.parametrize("n", [0, 65, 10**9, "3", 2.5, True])
def test_the_playground_refuses_a_bad_image_count_before_calling_the_server(n):
    import argparse

    from playground import Server

    server = Server(argparse.Namespace(front="kserve", url="http://127.0.0.1:9", model="m", api_key_file=None))
    status, answer = server.generate({"prompt": "x", "n": n})  # port 9: nothing listens, so no call was made
    assert status == 400 and "`n` (images) must be an integer in 1..64" in answer["error"]
