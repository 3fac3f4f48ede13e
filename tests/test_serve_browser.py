"""End-to-end tests of ``sdfsmis serve`` in a real browser: Debian's Chromium driven by Playwright.

The browser is the system's (``executable_path``); nothing is downloaded. The tests skip, saying why,
when Playwright or Chromium is missing. Each test runs one real prediction of one organ with the
bundled model on the CPU. Set ``SDFSMIS_UPDATE_SCREENSHOT=1`` to refresh docs/serve.png.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

DEMO = Path(__file__).resolve().parents[1] / "src" / "sdfsmis" / "assets" / "demo"
DOCS = Path(__file__).resolve().parents[1] / "docs"


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def launch_chromium(playwright):
    """Headless system Chromium with a software WebGL2 (SwiftShader), as on a machine without a GPU."""
    return playwright.chromium.launch(
        executable_path=find_chromium(), headless=True,
        args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"])


class Server:
    """``sdfsmis serve``'s app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, workspace: Path, **cfg):
        import uvicorn

        from sdfsmis.serve import ServeConfig, create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = create_app(ServeConfig(workspace=workspace, **cfg))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def liver_target() -> tuple[int, int, int, float]:
    """Canonical (RAS) voxel of the demo query's liver centre on its largest slice, and a safe radius."""
    lab = np.asanyarray(nib.as_closest_canonical(nib.load(DEMO / "query_label.nii.gz")).dataobj) == 1
    z = int(lab.sum(axis=(0, 1)).argmax())
    dist = ndimage.distance_transform_edt(lab[:, :, z])
    x, y = np.unravel_index(int(dist.argmax()), dist.shape)
    return int(x), int(y), z, float(dist.max()) * 0.6


@pytest.fixture(scope="module")
def browser():
    pw = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    if find_chromium() is None:
        pytest.skip("no system Chromium (apt-get install -y chromium); the tests never download a browser")
    with pw.sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@pytest.fixture()
def server(tmp_path):
    with Server(tmp_path / "workspace") as srv:
        yield srv


def open_demo(page, server: Server) -> None:
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready]")
    page.click("#demo")
    page.wait_for_selector("body[data-loaded='demo/query_image.nii.gz']", timeout=30_000)
    assert page.inner_text("#error") == ""


def draw_liver(page) -> int:
    """Axial view, slice of the liver's largest extent, a filled disc drawn with the mouse; returns z."""
    x, y, z, radius = liver_target()
    page.click("button[data-view='axial']")
    page.click("button[data-tool='fill']")
    page.evaluate("([x, y, z]) => { const nv = window.sdfsmis.nv; nv.scene.crosshairPos = nv.vox2frac([x, y, z]);"
                  " nv.drawScene(); }", [x, y, z])
    box = page.locator("#gl").bounding_box()
    points = []
    for k in range(25):
        a = 2 * math.pi * k / 24
        vox = [x + radius * math.cos(a), y + radius * math.sin(a), z]
        pos = page.evaluate("(v) => { const nv = window.sdfsmis.nv; const p = nv.frac2canvasPos(nv.vox2frac(v));"
                            " return p && [p[0] / nv.uiData.dpr, p[1] / nv.uiData.dpr]; }", vox)
        assert pos is not None
        points.append((box["x"] + pos[0], box["y"] + pos[1]))
    page.mouse.move(*points[0])
    page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*p, steps=2)
    page.mouse.up()
    drawn = page.evaluate("() => window.sdfsmis.nv.drawBitmap.reduce((n, v) => n + (v === 1), 0)")
    assert drawn > 200, f"only {drawn} voxels drawn"
    return z


def wait_job(page) -> str:
    page.wait_for_function("() => ['done', 'failed', 'cancelled'].includes(document.body.dataset.job)",
                           timeout=300_000)
    return page.evaluate("() => document.body.dataset.job")


def test_draw_segment_download(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 760})
    open_demo(page, server)
    z = draw_liver(page)
    page.click("#segment")
    assert wait_job(page) == "done", page.inner_text("#error")
    page.wait_for_function("() => window.sdfsmis.nv.volumes.length === 2")  # the overlay is shown
    legend = page.inner_text("#legend tbody")
    assert "liver" in legend
    shot = DOCS / "serve.png" if os.environ.get("SDFSMIS_UPDATE_SCREENSHOT") else tmp_path / "serve.png"
    page.click("button[data-view='multi']")
    page.wait_for_timeout(300)
    page.screenshot(path=str(shot))
    with page.expect_download() as info:
        page.click("#dl-nii")
    out = tmp_path / "seg.nii.gz"
    info.value.save_as(out)
    seg, query = nib.load(out), nib.load(DEMO / "query_image.nii.gz")
    assert seg.shape == query.shape
    np.testing.assert_allclose(seg.affine, query.affine, atol=1e-4)
    pred = np.asanyarray(nib.as_closest_canonical(seg).dataobj)
    truth = np.asanyarray(nib.as_closest_canonical(nib.load(DEMO / "query_label.nii.gz")).dataobj) == 1
    assert set(np.unique(pred)) == {0, 1}  # one organ drawn, one organ found
    liver = pred == 1
    assert liver[:, :, z].sum() > 0
    assert (liver & truth).sum() / liver.sum() > 0.5  # most of what was found is liver
    with page.expect_download() as info:
        page.click("#dl-json")
    info.value.save_as(tmp_path / "seg.json")
    assert '"organs"' in (tmp_path / "seg.json").read_text()
    # correct and add: the result on another slice is copied into the drawing, next to the drawn slice
    z2 = max(int(k) for k in np.flatnonzero(liver.any(axis=(0, 1))) if k != z)
    page.evaluate("([z]) => { const nv = window.sdfsmis.nv; const f = nv.scene.crosshairPos;"
                  " nv.scene.crosshairPos = nv.vox2frac([nv.frac2vox(f)[0], nv.frac2vox(f)[1], z]); nv.drawScene(); }",
                  [z2])
    page.click("#fromresult")
    page.wait_for_function("(t) => document.getElementById('support').textContent.endsWith(t)",
                           arg=f"{min(z, z2)}, {max(z, z2)}")
    page.close()


def test_save_and_apply_support_set(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 760})
    open_demo(page, server)
    draw_liver(page)
    page.fill("#setname", "liver-demo")
    page.click("#saveset")
    page.wait_for_function("() => document.getElementById('status').textContent.includes('saved support set')")
    assert (server.app.state.workspace.root / "support-sets" / "liver-demo.sdfset").is_file()
    page.select_option("#scan", "demo/support_image.nii.gz")
    page.click("#open")
    page.wait_for_selector("body[data-loaded='demo/support_image.nii.gz']")
    page.select_option("#sets", "liver-demo")
    page.click("#applyset")
    assert wait_job(page) == "done", page.inner_text("#error")
    assert "liver" in page.inner_text("#legend tbody")
    job = page.evaluate("() => window.sdfsmis.state.job")
    seg = server.app.state.workspace.root / "results" / job["id"] / "segmentation.nii.gz"
    pred = np.asanyarray(nib.load(seg).dataobj) == 1
    truth = np.asanyarray(nib.load(DEMO / "support_label.nii.gz").dataobj) == 1
    assert pred.sum() > 0 and (pred & truth).sum() / pred.sum() > 0.5
    page.close()


def test_page_reports_bad_input(browser, server):
    """A bad upload and a segmentation without a drawing show the server's message in the page."""
    page = browser.new_page()
    open_demo(page, server)
    page.click("#segment")  # nothing drawn yet
    page.wait_for_selector("#error:not([hidden])")
    assert "outline an organ" in page.inner_text("#error")
    bad = server.app.state.workspace.tmp / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    page.set_input_files("#upload", str(bad))
    page.wait_for_function("() => document.getElementById('error').textContent.includes('broken.nii.gz')")
    assert not (server.app.state.workspace.root / "uploads" / "broken.nii.gz").exists()
    page.close()
