"""``carry_forward`` against the Gradio browser client, in headless Chromium.

Gradio's client applies each streamed chunk as a diff, in place, to the objects of the chunk before.
A component not mounted yet (in a tab that has not opened) holds a reference to its pending value;
when a later chunk leaves that output out, the diff rewrites the held object into a skip marker and
the image comes up empty. A CI run of the Explore test saw exactly that: the status said Done, the
result image was empty. This test builds that case in a small Blocks app: the image lives in a tab
opened only after the run ended, and the stream's last chunk sets another output only. Through
``carry_forward`` every page shows the image; without it (Gradio 6.31) none did.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser_support import browser, new_page  # noqa: E402, F401  (browser: a fixture)

from diffusion_core.ui.glue import carry_forward  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.browser]  # tiers: python -m pytest -m "not slow and not browser" leaves these out

gr = pytest.importorskip("gradio")

PAGES = 4


@pytest.fixture(scope="module")
def server():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    with gr.Blocks() as demo:
        with gr.Tabs():
            with gr.Tab("Status"):
                status = gr.Markdown(elem_id="status")
            with gr.Tab("Result"):
                image = gr.Image(format="png", elem_id="image")
                files = gr.File(elem_id="files")

        def run():
            digit = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
            chunks = [{image: None, status: "starting"}, {image: digit, status: "Done"}, {files: None, status: "Finished"}]
            yield from carry_forward(chunks)

        demo.load(run, None, [image, status, files])
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    yield url
    demo.close()


def test_an_image_streamed_into_an_unopened_tab_survives_a_later_chunk(server, browser):
    shown = 0
    for _ in range(PAGES):
        page = new_page(browser)
        page.goto(server)
        page.locator("#status").filter(has_text="Finished").wait_for()  # the last chunk (which leaves the image out) is in
        page.get_by_role("tab", name="Result").click()
        try:
            page.locator("#image img").wait_for(timeout=5000)
            shown += 1
        except Exception:  # noqa: BLE001  (a Playwright timeout: counted, then asserted)
            pass
        page.context.close()
    assert shown == PAGES, f"the image was empty on {PAGES - shown} of {PAGES} pages"
