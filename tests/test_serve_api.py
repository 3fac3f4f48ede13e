"""``sdfsmis serve``'s HTTP API without a browser: safety rules, jobs, support sets (tiny random model)."""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from sdfsmis import support_sets  # noqa: E402
from sdfsmis.serve import ServeConfig, create_app, is_loopback  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "src" / "sdfsmis" / "assets" / "demo"


def client(ws: Path, **cfg) -> TestClient:
    return TestClient(create_app(ServeConfig(workspace=ws, **cfg)), base_url="http://127.0.0.1")


@pytest.fixture()
def api(tmp_path, tiny_model):
    with client(tmp_path / "ws", checkpoint=str(tiny_model)) as c:
        c.post("/api/demo").raise_for_status()
        yield c


def one_slice_annotation(tmp_path: Path, label: int = 1) -> bytes:
    """The demo query's own label ``label`` on its largest slice only, as NIfTI bytes (the page's drawing)."""
    img = nib.load(DEMO / "query_label.nii.gz")
    lab = np.asanyarray(img.dataobj)
    z = int((lab == label).sum(axis=(0, 1)).argmax())
    out = np.zeros_like(lab)
    out[:, :, z] = np.where(lab[:, :, z] == label, label, 0)
    path = tmp_path / "drawn.nii"
    nib.save(nib.Nifti1Image(out, img.affine), str(path))
    return path.read_bytes()


def wait(api: TestClient, job_id: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = api.get(f"/api/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError("job did not finish")


def workspace_files(api: TestClient) -> set[str]:
    root = api.app.state.workspace.root
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------- safety
def test_loopback_hosts():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_upload_checks_and_limit(api, tmp_path):
    before = workspace_files(api)
    r = api.post("/api/scans", files={"file": ("scan.nii.gz", b"garbage", "application/octet-stream")})
    assert r.status_code == 400 and "scan.nii.gz" in r.json()["error"]
    r = api.post("/api/scans", files={"file": ("notes.txt", b"x", "text/plain")})
    assert r.status_code == 400 and "end with .nii.gz or .nii" in r.json()["error"]
    assert workspace_files(api) == before  # nothing written
    r = api.post("/api/scans", files={"file": ("../../evil.nii.gz", (DEMO / "query_image.nii.gz").read_bytes())})
    assert r.status_code == 200 and r.json()["scan"] == "uploads/evil.nii.gz"  # only the base name is used
    assert not (tmp_path / "evil.nii.gz").exists()
    r = api.post("/api/scans", files={"file": ("mine.nii.gz", (DEMO / "query_image.nii.gz").read_bytes())})
    assert r.status_code == 200 and r.json()["scan"] == "uploads/mine.nii.gz"
    assert api.get("/api/files/uploads/mine.nii.gz").content == (DEMO / "query_image.nii.gz").read_bytes()
    with client(tmp_path / "small", max_upload_mb=0.1) as small:
        before = workspace_files(small)
        r = small.post("/api/scans", files={"file": ("big.nii.gz", (DEMO / "query_image.nii.gz").read_bytes())})
        assert r.status_code == 413 and "limit" in r.json()["error"]
        assert workspace_files(small) == before


def test_no_path_leaves_the_workspace(api, tmp_path):
    secret = tmp_path / "secret.nii.gz"
    secret.write_bytes((DEMO / "query_image.nii.gz").read_bytes())
    root = api.app.state.workspace.root
    os.symlink(secret, root / "link.nii.gz")
    os.symlink(tmp_path, root / "linkdir")
    for path in ("../secret.nii.gz", "%2e%2e/secret.nii.gz", "linkdir/secret.nii.gz", "link.nii.gz",
                 "demo/../../secret.nii.gz", "demo/..%2f..%2fsecret.nii.gz"):
        r = api.get(f"/api/files/{path}")
        assert r.status_code in (400, 404), path
        assert r.content != secret.read_bytes()
    assert api.get(f"/api/files/{secret}").status_code in (400, 404)  # absolute
    assert "link.nii.gz" not in api.get("/api/scans").json()["scans"]
    assert not any("secret" in s for s in api.get("/api/scans").json()["scans"])
    (root / "notes.txt").write_text("x")
    assert api.get("/api/files/notes.txt").status_code == 400
    for scan in ("../secret.nii.gz", "link.nii.gz", str(secret)):
        r = api.post("/api/segment", data={"scan": scan}, files={"annotation": ("a.nii", one_slice_annotation(tmp_path))})
        assert r.status_code == 400, scan
    for name in ("../x", "a/b", ".hidden"):
        r = api.post("/api/support-sets", data={"scan": "demo/query_image.nii.gz", "name": name},
                     files={"annotation": ("a.nii", one_slice_annotation(tmp_path))})
        assert r.status_code == 400 and "not allowed" in r.json()["error"], name
    assert not list(tmp_path.glob("*.sdfset")) and not list(tmp_path.glob("x*"))


def test_token_and_host(tmp_path):
    with client(tmp_path / "ws", token="s3cret", allowed_hosts=None) as c:
        assert c.get("/api/scans").status_code == 401
        assert c.get("/api/scans", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/scans", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.get("/?token=s3cret")
        assert r.status_code == 200 and "sdfsmis_token" in r.headers["set-cookie"]
        assert c.get("/api/scans").status_code == 200  # the cookie now carries it
    with client(tmp_path / "ws") as c:
        assert c.get("/api/scans", headers={"Host": "attacker.example"}).status_code == 400
        r = c.post("/api/demo", headers={"Origin": "http://attacker.example"})
        assert r.status_code == 403 and not (tmp_path / "ws" / "demo").exists()
        assert c.post("/api/demo", headers={"Origin": "http://127.0.0.1"}).status_code == 200


# ------------------------------------------------------------------------------------- jobs
def test_segment_job_and_downloads(api, tmp_path):
    r = api.post("/api/segment", data={"scan": "demo/query_image.nii.gz",
                                       "labels": json.dumps([{"id": 1, "name": "liver", "colour": "#ff0000"}])},
                 files={"annotation": ("annotation.nii", one_slice_annotation(tmp_path))})
    assert r.status_code == 200, r.text
    job = wait(api, r.json()["id"])
    assert job["state"] == "done", job
    assert [o["name"] for o in job["organs"]] == ["liver"] and job["organs"][0]["volume_ml"] >= 0
    nii = api.get(job["segmentation"])
    assert nii.status_code == 200 and "query_image_segmentation.nii.gz" in nii.headers["content-disposition"]
    seg = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(nii.content))
    query = nib.load(DEMO / "query_image.nii.gz")
    assert seg.shape == query.shape and np.allclose(seg.affine, query.affine, atol=1e-5)
    assert api.get(job["summary"]).json()["organs"][0]["label"] == 1
    assert api.get("/api/jobs/nope").status_code == 404


def test_bad_annotation_is_a_4xx_with_the_cli_message(api, tmp_path):
    before = workspace_files(api)
    r = api.post("/api/segment", data={"scan": "demo/query_image.nii.gz"})
    assert r.status_code == 400 and "draw an organ" in r.json()["error"]
    small = tmp_path / "small.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), str(small))
    r = api.post("/api/segment", data={"scan": "demo/query_image.nii.gz"},
                 files={"annotation": ("a.nii", small.read_bytes())})
    assert r.status_code == 400 and "shape (4, 4, 4) differs" in r.json()["error"]
    r = api.post("/api/segment", data={"scan": "demo/query_image.nii.gz", "labels": "{oops"},
                 files={"annotation": ("a.nii", one_slice_annotation(tmp_path))})
    assert r.status_code == 400 and "labels must be JSON" in r.json()["error"]
    assert workspace_files(api) == before


def test_cancel_and_failure_leave_nothing_and_server_keeps_serving(api, tmp_path, monkeypatch):
    import sdfsmis.serve.jobs as jobs

    def slow(*args, callback, **kw):  # the real predict, slowed down between batches
        def tick(done, total):
            time.sleep(0.2)
            callback(done, total)
        return real(*args, callback=tick, **kw)

    real = jobs.run_prediction
    monkeypatch.setattr(jobs, "run_prediction", lambda *a, **k: slow(*a[:-1], callback=a[-1], **k))
    monkeypatch.setattr(api.app.state.jobs.options, "batch_size", 1)
    annotation = one_slice_annotation(tmp_path)
    job = api.post("/api/segment", data={"scan": "demo/query_image.nii.gz"},
                   files={"annotation": ("a.nii", annotation)}).json()
    deadline = time.time() + 60
    while (state := api.get(f"/api/jobs/{job['id']}").json())["done"] < 1:
        assert state["state"] in ("queued", "running") and time.time() < deadline, state
        time.sleep(0.05)
    assert api.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
    assert wait(api, job["id"])["state"] == "cancelled"
    assert not (api.app.state.workspace.root / "results" / job["id"]).exists()

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(jobs, "run_prediction", broken)
    job = api.post("/api/segment", data={"scan": "demo/query_image.nii.gz"},
                   files={"annotation": ("a.nii", annotation)}).json()
    done = wait(api, job["id"])
    assert done["state"] == "failed" and "disk on fire" in done["error"]
    assert not (api.app.state.workspace.root / "results" / job["id"]).exists()
    assert api.get("/api/scans").status_code == 200
    assert api.get(f"/api/jobs/{job['id']}/segmentation.nii.gz").status_code == 404


def test_predict_progress_callback_can_stop_it(tmp_path, tiny_model):
    from sdfsmis.predict import predict

    seen = []

    def stop(done, total):
        seen.append((done, total))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict(DEMO / "support_image.nii.gz", DEMO / "support_label.nii.gz", DEMO / "query_image.nii.gz",
                tmp_path / "out.nii.gz", labels=[1], checkpoint=tiny_model, progress=False, progress_callback=stop)
    assert seen and seen[0][1] > 0 and list(tmp_path.iterdir()) == []


def test_concurrent_requests(api, tmp_path):
    data = (DEMO / "query_image.nii.gz").read_bytes()
    annotation = one_slice_annotation(tmp_path)

    def upload(_):
        return api.post("/api/scans", files={"file": ("same.nii.gz", data)})

    def segment(_):
        return api.post("/api/segment", data={"scan": "demo/query_image.nii.gz"},
                        files={"annotation": ("a.nii", annotation)})

    with ThreadPoolExecutor(6) as pool:
        ups = list(pool.map(upload, range(6)))
        segs = list(pool.map(segment, range(3)))
        reads = list(pool.map(lambda _: api.get("/api/files/demo/query_image.nii.gz"), range(6)))
    assert all(r.status_code == 200 for r in ups + segs + reads)
    assert len({r.json()["scan"] for r in ups}) == 6
    assert all(r.content == data for r in reads)
    assert [wait(api, r.json()["id"])["state"] for r in segs] == ["done"] * 3
    assert not list(api.app.state.workspace.tmp.iterdir())


# ------------------------------------------------------------------------------ support sets
def test_support_set_save_apply_export_import(api, tmp_path, tiny_model):
    form = {"scan": "demo/query_image.nii.gz", "name": "liver one",
            "labels": json.dumps([{"id": 1, "name": "liver", "colour": "#aa0000"}])}
    r = api.post("/api/support-sets", data=form, files={"annotation": ("a.nii", one_slice_annotation(tmp_path))})
    assert r.status_code == 200, r.text
    meta = r.json()
    assert meta["labels"] == [{"id": 1, "name": "liver", "colour": "#aa0000"}] and len(meta["slices"]) == 1
    assert meta["spacing"][2] == pytest.approx(7.7, abs=1e-3)
    r = api.post("/api/support-sets", data=form, files={"annotation": ("a.nii", one_slice_annotation(tmp_path))})
    assert r.status_code == 409
    assert [s["name"] for s in api.get("/api/support-sets").json()["support_sets"]] == ["liver one"]

    job = api.post("/api/segment", data={"scan": "demo/support_image.nii.gz", "support_set": "liver one"}).json()
    done = wait(api, job["id"])
    assert done["state"] == "done" and [o["name"] for o in done["organs"]] == ["liver"]

    exported = api.get("/api/support-sets/liver one/export")
    assert exported.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(exported.content)).namelist()
    assert sorted(names) == ["image.nii.gz", "mask.nii.gz", "support_set.json"]
    assert api.post("/api/support-sets/import", files={"file": ("x.sdfset", exported.content)}).status_code == 409
    with client(tmp_path / "other", checkpoint=str(tiny_model)) as other:
        r = other.post("/api/support-sets/import", files={"file": ("x.sdfset", exported.content)})
        assert r.status_code == 200 and r.json()["name"] == "liver one"
        before = workspace_files(other)
        r = other.post("/api/support-sets/import", files={"file": ("bad.sdfset", b"PK not really")})
        assert r.status_code == 400 and "bad.sdfset" in r.json()["error"]
        assert workspace_files(other) == before
    assert api.post("/api/segment", data={"scan": "demo/query_image.nii.gz", "support_set": "nope"}).status_code == 400


def test_support_set_file_round_trip_and_cli(tmp_path, tiny_model):
    from sdfsmis.cli import main
    from sdfsmis.errors import InputError

    sset = support_sets.from_annotation(DEMO / "support_image.nii.gz", DEMO / "support_label.nii.gz", "demo4")
    assert [lab.id for lab in sset.labels] == [1, 2, 3, 4]
    path = support_sets.save(sset, tmp_path / "demo4.sdfset")
    back = support_sets.load(path)
    assert back.slices == sset.slices and np.array_equal(back.mask, sset.mask)
    np.testing.assert_allclose(back.image, sset.image)
    image, mask = support_sets.materialise(back, tmp_path)
    m = np.asanyarray(nib.load(mask).dataobj)
    assert m.shape[2] == sset.depth and set(np.flatnonzero(m.any(axis=(0, 1)))) == set(sset.slices)
    out = tmp_path / "pred.nii.gz"
    assert main(["-q", "predict", "--support-set", str(path), "--query", str(DEMO / "query_image.nii.gz"),
                 "--out", str(out), "--labels", "1", "--checkpoint", str(tiny_model), "--no-overlay"]) == 0
    assert nib.load(out).shape == nib.load(DEMO / "query_image.nii.gz").shape
    bad = tmp_path / "bad.sdfset"
    bad.write_bytes(b"nope")
    assert main(["predict", "--support-set", str(bad), "--query", str(DEMO / "query_image.nii.gz"),
                 "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert main(["predict", "--query", str(DEMO / "query_image.nii.gz"), "--out", str(tmp_path / "x.nii.gz")]) == 2
    with pytest.raises(InputError, match="not a support set"):
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("support_set.json", "{}")
        support_sets.load(bad)
    assert not (tmp_path / "x.nii.gz").exists()


def test_serve_command_defaults_to_loopback(monkeypatch, tmp_path, capsys):
    import uvicorn

    from sdfsmis.cli import build_parser, main

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(host=host, port=port))
    assert main(["serve", "--host", "192.0.2.1", "--port", "9", "--workspace", str(tmp_path / "w"),
                 "--token", "t0k"]) == 0
    out = capsys.readouterr()
    assert seen == {"host": "192.0.2.1", "port": 9} and "warning: serving on 192.0.2.1" in out.err
    assert "http://192.0.2.1:9/?token=t0k" in out.out and (tmp_path / "w" / "support-sets").is_dir()
