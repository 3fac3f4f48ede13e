"""Time ``sdfsmis serve`` on the bundled demo: first image in the browser, and 4 organs segmented.

    python benchmarks/serve_speed.py [--repeats 3] [--chromium /usr/bin/chromium]

1. **First image**: a fresh headless Chromium page opens ``/?scan=demo/query_image.nii.gz``; the figure
   is the time from navigation start until NiiVue has the scan loaded and drawn
   (``window.sdfsmisFirstImageMs``, set by the page). Target: <= 2 s.
2. **Segment 4 organs**: the demo support scan with its 4-organ label volume is saved as a support set
   and applied to the demo query scan through the app's API (the same ``predict`` path as the CLI);
   the figure is the wall time from the request until the job reports done. Target: <= 8 s.

Runs the server in this process on a free loopback port with the bundled model on the CPU. Prints
the figures, the CPU count and the load average (the figures depend on what else runs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "src" / "sdfsmis" / "assets" / "demo"


def start_server(workspace: Path):
    import uvicorn

    from sdfsmis.serve import ServeConfig, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(ServeConfig(workspace=workspace)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def first_image(url: str, chromium: str, repeats: int) -> list[float]:
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
        for _ in range(repeats):
            page = browser.new_page()
            page.goto(f"{url}/?scan=demo/query_image.nii.gz")
            page.wait_for_function("() => window.sdfsmisFirstImageMs", timeout=60_000)
            times.append(page.evaluate("() => window.sdfsmisFirstImageMs") / 1000.0)
            page.close()
        browser.close()
    return times


def segment_four(url: str, repeats: int) -> list[tuple[float, float]]:
    import httpx

    out = []
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/api/support-sets", data={"scan": "demo/support_image.nii.gz", "name": "demo4", "overwrite": "1"},
                   files={"annotation": ("support_label.nii.gz", (DEMO / "support_label.nii.gz").read_bytes())})
        r.raise_for_status()
        for _ in range(repeats):
            t0 = time.perf_counter()
            job = c.post("/api/segment", data={"scan": "demo/query_image.nii.gz", "support_set": "demo4"}).json()
            while (job := c.get(f"/api/jobs/{job['id']}").json())["state"] in ("queued", "running"):
                time.sleep(0.05)
            if job["state"] != "done":
                raise SystemExit(f"job {job['state']}: {job.get('error')}")
            out.append((time.perf_counter() - t0, job["seconds"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server, url = start_server(Path(tmp))
        import httpx

        httpx.post(url + "/api/demo").raise_for_status()
        print(f"cpus {os.cpu_count()}, load average before {os.getloadavg()[0]:.2f}, torch threads "
              f"{__import__('torch').get_num_threads()}")
        if args.chromium:
            t = first_image(url, args.chromium, args.repeats)
            print(f"first image (s, {args.repeats} fresh pages): " + ", ".join(f"{x:.2f}" for x in t)
                  + f"; median {statistics.median(t):.2f} (target <= 2)")
        else:
            print("first image: skipped, no chromium found", file=sys.stderr)
        s = segment_four(url, args.repeats)
        print(f"segment 4 organs, demo support set -> demo query (s, request to done): "
              + ", ".join(f"{w:.2f}" for w, _ in s) + f"; median {statistics.median(w for w, _ in s):.2f} "
              f"(predict's own total: median {statistics.median(p for _, p in s):.2f}; target <= 8)")
        print(f"load average after {os.getloadavg()[0]:.2f}")
        server.should_exit = True


if __name__ == "__main__":
    main()
