"""Training stage: typed config, checkpoints, exact resume, logs, loss decrease.

The end-to-end tests use the real tiny model and the real episode sampler on a small synthetic
prepared dataset; the checkpoint-failure, validation and worker tests use a small stand-in model
with the same methods (faster).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sdfsmis import train as T
from sdfsmis.data.datasets import SPECS
from sdfsmis.errors import InputError
from sdfsmis.training import checkpoints

X = Y = 32  # synthetic volumes: 32 x 32 x Z, the tiny tier's working size
Z = 6
H = 16  # stand-in episodes


# ------------------------------------------------------------------------ synthetic prepared data
def _volumes(i: int) -> dict[str, np.ndarray]:
    """Four quadrant supervoxels, 3 slices deep (ids 1-4 then 5-8), each with its own intensity."""
    x, y, z = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    quadrant = (x >= X // 2).astype(np.int32) + 2 * (y >= Y // 2)
    sv = (1 + quadrant + 4 * (z // 3)).astype(np.int32)
    rng = np.random.default_rng(i)
    image = (quadrant / 1.5 - 1.0 + 0.1 * rng.standard_normal((X, Y, Z))).clip(-1, 1)
    label = np.zeros((X, Y, Z), np.uint8)
    label[4:14, 4:14, 1:5] = 1  # liver
    pairs = [(k, s) for k in range(Z - 1) for s in np.unique(sv[:, :, k])
             if np.any(sv[:, :, k + 1] == s)]
    return {"image": image.astype(np.float16), "label": label, "body": np.ones((X, Y, Z), bool),
            "supervoxels": sv, "sv_pairs": np.asarray(pairs, np.int32)}


def write_prepared(root: Path, n_scans: int = 5) -> Path:
    """A prepared-dataset folder in the documented format (docs/architecture.md)."""
    spec = SPECS["abd-mri"]
    (root / "scans").mkdir(parents=True)
    scans = []
    for i in range(n_scans):
        v = _volumes(i)
        np.savez_compressed(root / "scans" / f"{i}.npz", **v)
        class_slices = {str(lab): np.nonzero((v["label"] == lab).any(axis=(0, 1)))[0].tolist()
                        for lab in np.unique(v["label"]) if lab}
        scans.append({"id": str(i), "file": f"scans/{i}.npz", "shape": [X, Y, Z],
                      "spacing": [1.0, 1.0, 3.0], "affine": np.eye(4).tolist(),
                      "class_slices": class_slices, "n_supervoxels": int(v["supervoxels"].max()),
                      "n_sv_pairs": len(v["sv_pairs"])})
    meta = {"format_version": 1, "dataset": spec.name, "spec": dataclasses.asdict(spec),
            "source": str(root), "scans": scans,
            "supervoxels": {"method": "felzenszwalb3d", "min_size": 5000, "sigma": 0.0, "scale": 1.0}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("prepared"))


def tiny_cfg(out_dir: Path, data: Path | None = None, *extra: str) -> T.TrainConfig:
    """The real tiny model on the synthetic data: 4 steps, checkpoint every 2, log every step."""
    return T.load_config(None, [
        f"out_dir={out_dir}", f"data={data or ''}", "iterations=4", "checkpoint_every=2",
        "log_every=1", "model.backbone.tier=tiny", "episodes.image_size=32",
        "episodes.min_mask_px=20", "optim.lr_scratch=1e-3", "optim.lr_new=1e-3", *extra])


# ------------------------------------------------------------------------------ stand-in pieces
class StandIn(nn.Module):
    """Same methods as the real models: a conv 'backbone' and a 1x1 'new' layer."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.width = width
        self.backbone = nn.Conv2d(3, width, 3, padding=1)
        self.new = nn.Conv2d(width, 1, 1)

    def training_loss(self, batch):
        x = torch.cat([batch["query_images"], batch["support_images"][:, 0],
                       batch["support_masks"][:, 0]], dim=1)
        pred = self.new(torch.relu(self.backbone(x)))
        pred = torch.nn.functional.dropout(pred, 0.1, training=self.training)  # global RNG
        return torch.nn.functional.mse_loss(pred, batch["query_masks"])

    def parameter_groups(self, lr_backbone, lr_new):
        return [{"params": list(self.backbone.parameters()), "lr": lr_backbone},
                {"params": list(self.new.parameters()), "lr": lr_new}]

    def save_pretrained(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()},
                  folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"width": self.width}))

    @classmethod
    def from_pretrained(cls, folder):
        model = cls(**json.loads((Path(folder) / "config.json").read_text()))
        model.load_state_dict(load_file(Path(folder) / "model.safetensors"))
        return model


class RandomEpisodes:
    """Episodes drawn only from the generator."""

    device = torch.device("cpu")

    def __init__(self, offset: float = 0.0):
        self.offset = offset

    def sample(self, batch_size, generator):
        img = torch.rand(batch_size, 1, H, H, generator=generator) * 2 - 1
        sup = torch.rand(batch_size, 1, 1, H, H, generator=generator) * 2 - 1
        return {"query_images": img + self.offset, "query_masks": (img > 0.2).float(),
                "support_images": sup, "support_masks": (sup > 0.2).float()}


def run_standin(cfg, **kw):
    return T.train(cfg, progress=False, model_factory=lambda mc: StandIn(),
                   sampler_factory=lambda c, d: RandomEpisodes(), **kw)


def standin_cfg(out_dir: Path, *extra: str) -> T.TrainConfig:
    return T.load_config(None, [f"out_dir={out_dir}", "iterations=6", "checkpoint_every=2",
                                "log_every=1", "optim.lr_scratch=1e-2", "optim.lr_new=1e-2",
                                "model.backbone.tier=tiny", *extra])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------------------ config
def test_config_file_and_overrides_are_typed(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"data": ["a", "b"], "iterations": 100,
                                    "optim": {"lr_new": 1e-4}, "model": {"method": "diffews"}}))
    cfg = T.load_config(cfg_file, ["optim.weight_decay=0.5", "batch_size=4", "seed=7",
                                   "gradient_checkpointing=true", "model.backbone.tier=tiny",
                                   "episodes.shots=3", "optim.betas=[0.8,0.9]", "data=x,y,z",
                                   "episodes.augment.scale=[1.0,1.1]", "model.backbone.path=null",
                                   "episodes.organs=liver,spleen", "train_scans=all"])
    assert cfg.iterations == 100 and cfg.batch_size == 4 and cfg.seed == 7
    assert cfg.optim.lr_new == 1e-4 and cfg.optim.weight_decay == 0.5
    assert cfg.optim.lr_backbone == 1e-5 and cfg.optim.grad_clip == 1.0  # paper defaults kept
    assert cfg.optim.betas == (0.8, 0.9) and cfg.gradient_checkpointing is True
    assert cfg.model.method == "diffews" and cfg.model.backbone.tier == "tiny"
    assert cfg.model.backbone.path is None and cfg.train_scans == "all"
    assert cfg.model.threshold == "relative"  # resolved by ModelConfig
    assert cfg.episodes.shots == 3 and cfg.episodes.augment.scale == (1.0, 1.1)
    assert cfg.episodes.organs == ("liver", "spleen")
    assert [Path(p).name for p in cfg.data] == ["x", "y", "z"] and Path(cfg.data[0]).is_absolute()
    toml = tmp_path / "c.toml"
    toml.write_text('iterations = 9\n[optim]\nlr_new = 2e-4\n[episodes]\nfold = 2\n')
    cfg2 = T.load_config(toml, [])
    assert cfg2.iterations == 9 and cfg2.optim.lr_new == 2e-4 and cfg2.episodes.fold == 2
    T.save_config(cfg, tmp_path / "saved.json")  # the resolved config loads back unchanged
    assert T.config_to_dict(T.load_config(tmp_path / "saved.json")) == T.config_to_dict(cfg)


def test_defaults_are_the_paper_recipe():
    cfg = T.TrainConfig()
    assert (cfg.optim.weight_decay, cfg.optim.lr_backbone, cfg.optim.lr_new) == (1e-2, 1e-5, 5e-5)
    assert (cfg.batch_size, cfg.iterations, cfg.seed, cfg.optim.grad_clip) == (1, 15000, 42, 1.0)
    assert cfg.mixed_precision == "bf16" and cfg.optim.schedule == "constant"


@pytest.mark.parametrize("override", ["iterations=abc", "nope=1", "optim.lr_new.x=1",
                                      "mixed_precision=fp16", "batch_size", "batch_size=0",
                                      "gradient_checkpointing=2", "episodes.mode=other"])
def test_bad_overrides_raise_input_error(override):
    with pytest.raises(InputError):
        T.load_config(None, [override])


def test_bad_config_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        T.load_config(bad)
    with pytest.raises(InputError, match="missing.json"):
        T.load_config(tmp_path / "missing.json")
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"optim": {"lr": 1}}')
    with pytest.raises(InputError, match="optim.lr"):
        T.load_config(unknown)


# --------------------------------------------------------------------- end to end, real tiny model
def test_tiny_model_interrupted_and_resumed_run_is_exact(tmp_path, prepared):
    import resource

    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (KiB on Linux)
    final = T.train(tiny_cfg(full_dir, prepared), progress=False)
    assert final == full_dir / "model"
    stopped = T.train(tiny_cfg(part_dir, prepared), progress=False, max_steps=3)
    assert stopped.name == "step_0000002" and not (part_dir / "model").exists()
    resumed = T.train(tiny_cfg(part_dir, prepared), progress=False)  # resumes from step 2
    assert same_weights(final, resumed)
    ck = full_dir / "checkpoints" / "step_0000004"
    assert same_weights(final, ck / "model")
    for a, b in [(full_dir / "checkpoints/step_0000002/model", full_dir / "model")]:
        assert not same_weights(a, b)  # training moved the weights
    # the final model loads through the predictor's path (save_pretrained format)
    from sdfsmis.models.io import load_pretrained

    model = load_pretrained(final)
    assert type(model).__name__ == "SDFSMIS" and model.image_size == 32
    # layout: checkpoints, pointer, resolved config beside every checkpoint, log, plot
    assert sorted(p.name for p in (full_dir / "checkpoints").iterdir()) == [
        "latest", "step_0000002", "step_0000004"]
    assert (full_dir / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    for name in ("optimizer.pt", "rng.pt", "state.json", "config.json", "model/config.json"):
        assert (ck / name).is_file(), name
    assert T.config_to_dict(T.load_config(ck / "config.json")) == \
        T.config_to_dict(tiny_cfg(full_dir, prepared))
    opt = torch.load(ck / "optimizer.pt", weights_only=False)
    assert opt["scheduler"]["last_epoch"] == 4
    assert {g["name"]: g["lr"] for g in opt["optimizer"]["param_groups"]} == \
        {"backbone": 1e-3, "new": 1e-3}  # tiny tier: the UNet gets lr_scratch
    for out in (full_dir, part_dir):
        with (out / "log.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0]) == list(T.LOG_COLUMNS)
        assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # lost step 3 logged once
        assert all(float(r["loss"]) > 0 and float(r["sec_per_step"]) > 0 for r in rows)
        assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one invocations.csv row per call of train: the full run; the interrupted one and its resumption
    calls = {out: list(csv.DictReader((out / "invocations.csv").open())) for out in (full_dir, part_dir)}
    assert [(r["start_step"], r["end_step"]) for r in calls[full_dir]] == [("0", "4")]
    assert [(r["start_step"], r["end_step"]) for r in calls[part_dir]] == [("0", "3"), ("2", "4")]
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for r in calls[full_dir] + calls[part_dir]:
        assert list(r) == list(T.INVOCATION_COLUMNS)
        assert float(r["wall_s"]) >= float(r["median_step_s"]) > 0
        # the calls ran in this process: their peak lies between its peak before and after, in MiB
        assert rss_before - 1 <= float(r["peak_memory_mib"]) <= rss_after + 1
        assert r["memory"] == "process_rss" and r["device"] == "cpu"


class FixedEpisode:
    """The same batch at every step."""

    device = torch.device("cpu")

    def __init__(self, batch):
        self.batch = batch

    def sample(self, batch_size, generator):
        return self.batch


def test_tiny_model_loss_decreases_on_a_fixed_episode(tmp_path, prepared):
    cfg = tiny_cfg(tmp_path / "fixed", prepared, "iterations=8", "checkpoint_every=8")
    batch = T.build_sampler(cfg, progress=False).sample(2, torch.Generator().manual_seed(0))
    T.train(cfg, progress=False, sampler_factory=lambda c, d: FixedEpisode(batch))
    with (tmp_path / "fixed" / "log.csv").open() as fh:
        loss = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert len(loss) == 8 and loss[-1] < 0.3 * loss[0]


def test_image_size_mismatch_is_refused(tmp_path, prepared):
    cfg = tiny_cfg(tmp_path / "run", prepared, "episodes.image_size=64")
    with pytest.raises(InputError, match="image_size"):
        T.train(cfg, progress=False)


# ------------------------------------------------------------------------ stand-in model checks
def test_failed_checkpoint_leaves_no_partial_folder(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_standin(standin_cfg(out), max_steps=2)
    assert T.latest_checkpoint(out).name == "step_0000002"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "rng_state", broken)  # fails after model and optimizer were written
    with pytest.raises(OSError, match="disk full"):
        run_standin(standin_cfg(out), max_steps=4)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000002"]
    assert T.latest_checkpoint(out).name == "step_0000002"


def test_accumulation_workers_and_resume_agree(tmp_path):
    """Gradient accumulation + DataLoader workers + resume give the uninterrupted weights."""
    extra = ("gradient_accumulation_steps=2", "batch_size=2", "iterations=4")
    ref = run_standin(standin_cfg(tmp_path / "ref", *extra))
    out = tmp_path / "part"
    run_standin(standin_cfg(out, *extra, "num_workers=1"), max_steps=3)
    resumed = run_standin(standin_cfg(out, *extra, "keep_checkpoints=1"))
    assert same_weights(ref, resumed)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000004"]


def test_ema_model_is_the_moving_average_and_resume_is_exact(tmp_path):
    """With ema_decay, every model/ holds the moving average of the raw weights (training_model/),
    with diffusers' warm-up decay min(ema_decay, (1 + n) / (10 + n)); an interrupted and resumed run
    ends with the same raw and averaged weights as an uninterrupted one."""
    extra = ("ema_decay=0.5", "checkpoint_every=1", "keep_checkpoints=10")
    ref = run_standin(standin_cfg(tmp_path / "ref", *extra))
    steps = [tmp_path / "ref" / "checkpoints" / f"step_{k:07d}" for k in range(1, 7)]
    average = weights(steps[0] / "training_model")  # the first update copies the weights
    for k, ck in enumerate(steps[1:], start=1):
        decay = min(0.5, (1 + k) / (10 + k))
        raw = weights(ck / "training_model")
        average = {n: decay * average[n] + (1 - decay) * raw[n] for n in raw}
        assert all(torch.allclose(average[n], v, atol=1e-6) for n, v in weights(ck / "model").items())
    assert same_weights(ref, steps[-1] / "model") and not same_weights(ref, steps[-1] / "training_model")
    run_standin(standin_cfg(tmp_path / "part", *extra), max_steps=3)
    resumed = run_standin(standin_cfg(tmp_path / "part", *extra))
    assert same_weights(ref, resumed)
    assert same_weights(steps[-1] / "training_model", tmp_path / "part/checkpoints/step_0000006/training_model")


def test_validation_hook_and_resume_config_check(tmp_path):
    out = tmp_path / "run"
    seen = []

    def validate(model, step):
        assert not model.training and not torch.is_grad_enabled()
        seen.append(step)
        return {"dice": 0.5}

    run_standin(standin_cfg(out, "validate_every=2", "iterations=4", "checkpoint_every=4"),
                validate=validate)
    assert seen == [2, 4]
    with (out / "validation.csv").open() as fh:
        assert [r["step"] for r in csv.DictReader(fh)] == ["2", "4"]
    with pytest.raises(InputError, match="seed"):
        run_standin(standin_cfg(out, "seed=1", "iterations=4"))


def test_mixed_sampler_is_seeded_and_mixes():
    mixed = T.MixedSampler([RandomEpisodes(0.0), RandomEpisodes(10.0)])
    a = mixed.sample(16, torch.Generator().manual_seed(3))
    b = mixed.sample(16, torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    high = (a["query_images"].flatten(1).mean(1) > 5).sum().item()
    assert 0 < high < 16 and a["support_images"].shape == (16, 1, 1, H, H)
    assert T.step_seed(42, 1) != T.step_seed(42, 2) and T.step_seed(42, 1) == T.step_seed(42, 1)


def test_resume_from_an_explicit_checkpoint_into_a_new_folder(tmp_path):
    first = run_standin(standin_cfg(tmp_path / "a", "iterations=4"))
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000002"
    again = run_standin(standin_cfg(tmp_path / "b", "iterations=4", f"resume={ckpt}"))
    assert same_weights(first, again)
    with (tmp_path / "b" / "log.csv").open() as fh:
        assert [r["step"] for r in csv.DictReader(fh)] == ["3", "4"]
    with pytest.raises(InputError, match="no state.json"):
        run_standin(standin_cfg(tmp_path / "c", f"resume={tmp_path / 'nowhere'}"))


def test_build_sampler_over_several_datasets(prepared):
    cfg = tiny_cfg(Path("unused"), prepared)
    cfg.data = [str(prepared), str(prepared)]
    fold = T.build_sampler(cfg, progress=False)
    assert [s.train_ids for s in fold.samplers] == [["2", "3", "4"]] * 2  # outside fold 0
    cfg.train_scans = "all"
    everything = T.build_sampler(cfg, progress=False)
    assert everything.samplers[0].train_ids == ["0", "1", "2", "3", "4"]
    batch = everything.sample(3, torch.Generator().manual_seed(0))
    assert batch["support_masks"].shape == (3, 1, 1, X, Y)
    assert batch["query_images"].min() >= -1 and batch["query_images"].max() <= 1
    with pytest.raises(InputError, match="no training data"):
        T.build_sampler(T.load_config(None, []), progress=False)


def test_time_limit_stops_with_a_checkpoint_and_a_final_model(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 10))  # every perf_counter() call advances 10 s
    monkeypatch.setattr(T.time, "perf_counter", lambda: float(next(clock)))
    out = tmp_path / "run"
    final = run_standin(standin_cfg(out, "iterations=100", "checkpoint_every=50", "time_limit_s=45"))
    assert final == out / "model" and (final / "model.safetensors").is_file()
    step = T.latest_checkpoint(out)
    assert step is not None and 1 <= int(step.name.split("_")[1]) < 100
    with (out / "log.csv").open() as fh:
        assert int(list(csv.DictReader(fh))[-1]["step"]) == int(step.name.split("_")[1])


def test_cached_latents_give_the_same_batches_and_loss(prepared):
    """CachedEpisodeSampler returns what the model would compute from the sampler's images, and memoises masks."""
    from sdfsmis.latents import CachedEpisodeSampler
    from sdfsmis.models import build

    cfg = tiny_cfg(Path("unused"), prepared, "episodes.augment_which=none", "cache_latents=true")
    torch.manual_seed(0)
    model = build(cfg.model).eval()
    cached = T.build_sampler(cfg, progress=False, model=model).samplers[0]
    plain = T.build_sampler(dataclasses.replace(cfg, cache_latents=False), progress=False).samplers[0]
    assert isinstance(cached, CachedEpisodeSampler)
    a = cached.sample(4, torch.Generator().manual_seed(5))
    b = plain.sample(4, torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(a["query_latents"].float(), model.encode_images(b["query_images"]), atol=1e-2)
        assert torch.allclose(a["query_mask_latents"].float(), model.encode_masks(b["query_masks"]), atol=1e-2)
        assert torch.equal(a["support_masks"], b["support_masks"])
        assert torch.allclose(model.training_loss(a), model.training_loss(b), rtol=1e-2)
    seen = cached.cached_masks
    assert 0 < seen <= 8  # 4 episodes x (query + support)
    cached.sample(4, torch.Generator().manual_seed(5))
    assert cached.cached_masks == seen  # the same episodes encode nothing new
    with pytest.raises(ValueError, match="model.method=sdseg"):
        tiny_cfg(Path("unused"), prepared, "episodes.augment_which=none", "cache_latents=true", "model.method=sdseg")


def test_cached_latents_are_augmented_like_the_slices(prepared):
    """With augment_which=one, each episode's augmented side (query or support) gets one geometric
    transform on its latents, mask latents and pixel masks alike; the other side is untouched. At zero
    strength the batch is the unaugmented one; the same generator gives the same batch."""
    from sdfsmis.data.augment import AugmentConfig
    from sdfsmis.models import build

    cfg = tiny_cfg(Path("unused"), prepared, "episodes.augment_which=none", "cache_latents=true")
    torch.manual_seed(0)
    model = build(cfg.model).eval()

    def batch(**episodes):
        c = dataclasses.replace(cfg, episodes=dataclasses.replace(cfg.episodes, **episodes))
        return T.build_sampler(c, progress=False, model=model).samplers[0].sample(
            6, torch.Generator().manual_seed(5))

    identity = batch(augment_which="both", augment=AugmentConfig.identity())
    assert all(torch.allclose(batch()[k], identity[k], atol=1e-3) for k in identity)
    plain = batch(augment_which="one", augment=AugmentConfig.identity())  # the same episodes, unwarped
    zoom_out = {"augment_which": "one", "augment": AugmentConfig(scale=(0.7, 0.8))}
    one = batch(**zoom_out)
    assert all(torch.equal(one[k], v) for k, v in batch(**zoom_out).items())  # seeded

    def changed(key: str, i: int) -> bool:
        return not torch.allclose(one[key][i], plain[key][i])

    query_side = [changed("query_latents", i) for i in range(6)]
    assert any(query_side) and not all(query_side)
    for i, query in enumerate(query_side):
        assert changed("query_mask_latents", i) == query
        assert changed("support_latents", i) == changed("support_mask_latents", i) == (not query)
        assert changed("support_masks", i) == (not query)
        if not query:  # zoomed out: the warped support mask covers fewer pixels
            assert one["support_masks"][i].sum() < plain["support_masks"][i].sum()


def test_latent_store_is_shared_by_later_runs(prepared, tmp_path, monkeypatch):
    """With cache_dir, a second run reads the first run's slice and mask encodings instead of encoding,
    and gets the same batches; another image size or mode gets a store of its own."""
    from sdfsmis.models import build

    cfg = tiny_cfg(Path("unused"), prepared, "episodes.augment_which=none", "cache_latents=true",
                   f"cache_dir={tmp_path / 'cache'}")
    torch.manual_seed(0)
    model = build(cfg.model).eval()
    first = T.build_sampler(cfg, progress=False, model=model)
    a = first.samplers[0].sample(4, torch.Generator().manual_seed(5))
    first.save_cache()
    store = first.samplers[0].store
    assert sorted(p.stem for p in store.glob("*.safetensors")) == sorted(first.samplers[0].sampler.train_ids)

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded although the store has it")

    monkeypatch.setattr(model, "encode_images_and_features", no_encoding)
    monkeypatch.setattr(model, "encode_masks", no_encoding)
    second = T.build_sampler(cfg, progress=False, model=model).samplers[0]
    assert second.store == store
    b = second.sample(4, torch.Generator().manual_seed(5))
    assert second.cached_masks == first.samplers[0].cached_masks
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other = T.build_sampler(dataclasses.replace(cfg, episodes=dataclasses.replace(cfg.episodes, image_size=64)),
                            progress=False, model=model).samplers[0]
    assert other.store.parent == store.parent and other.store != store


def test_latent_store_is_shared_by_ablation_variants(prepared, tmp_path):
    """A run without VTCT (no image-encoder features) and one with it share one store: the second adds
    the features to the files and keeps the masks the first stored."""
    from safetensors.torch import load_file

    from sdfsmis.models import build

    base = ("episodes.augment_which=none", "cache_latents=true", f"cache_dir={tmp_path / 'cache'}")
    runs = []
    for extra in ("model.vtct=false", "model.vtct=true"):
        cfg = tiny_cfg(Path("unused"), prepared, *base, extra)
        torch.manual_seed(0)
        model = build(cfg.model).eval()
        sampler = T.build_sampler(cfg, progress=False, model=model)
        batch = sampler.samplers[0].sample(4, torch.Generator().manual_seed(5))
        sampler.save_cache()
        runs.append((model.uses_vtct, sampler.samplers[0], batch))
    (f0, s0, b0), (f1, s1, b1) = runs
    assert (f0, f1) == (False, True) and s0.store == s1.store
    assert "support_features" not in b0 and "support_features" in b1
    assert s1.cached_masks == s0.cached_masks  # read, not encoded again
    assert all(torch.equal(b0[k], b1[k]) for k in b0)
    files = [load_file(f) for f in s1.store.glob("*.safetensors")]
    assert all("features" in f for f in files) and sum(len(f.get("mask_keys", [])) for f in files) > 0
    with pytest.raises(ValueError, match="cache_latents"):
        dataclasses.replace(cfg, cache_latents=False)


def test_training_with_cache_dir_saves_masks_at_checkpoints(prepared, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_cfg(tmp_path / "run", prepared, "episodes.augment_which=none", "cache_latents=true",
                   f"cache_dir={tmp_path / 'cache'}")
    T.train(cfg, progress=False)
    files = list((tmp_path / "cache").glob("*/*.safetensors"))
    assert files and sum(len(load_file(f).get("mask_keys", [])) for f in files) > 0


def test_encode_images_and_features_runs_the_taesd_trunk_once():
    """With TAESD and its trunk as VTCT encoder (compact tier), the latents are the encoder's last
    layer on the features, equal to encode_images. Other pairs (the tiny tier: KL VAE, DINOv2) encode
    twice, with the same results."""
    from sdfsmis.models import build
    from sdfsmis.models.config import BackboneConfig, ModelConfig

    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    compact = build(ModelConfig(method="sdfsmis", backbone=BackboneConfig(tier="compact", image_size=64))).eval()
    tiny = build(ModelConfig(method="sdfsmis", backbone=BackboneConfig(tier="tiny"))).eval()
    assert compact._latent_head is not None and tiny._latent_head is None
    for model, images in ((compact, x), (tiny, x[..., :32, :32])):
        z, feats = model.encode_images_and_features(images)
        with torch.no_grad():
            torch.testing.assert_close(z, model.encode_images(images))
            torch.testing.assert_close(feats, model.image_encoder.features(images))


def test_intensity_bank_and_prefill(prepared, tmp_path, monkeypatch):
    """cache_bank=2 stores two intensity-augmented copies of every slice beside the plain encodings and
    draws episode images from all three; cache_prefill encodes every drawable mask before training, so
    sampling encodes nothing; a second run reads all of it from the store."""
    from safetensors.torch import load_file

    from sdfsmis.models import build

    bank = ["episodes.augment_which=none", "cache_latents=true", f"cache_dir={tmp_path / 'cache'}", "cache_bank=2",
            "cache_prefill=true", "episodes.augment.contrast=[0.5,0.6]", "episodes.augment.bias_field=0.3"]
    cfg = tiny_cfg(Path("unused"), prepared, *bank)
    torch.manual_seed(0)
    model = build(cfg.model).eval()
    cache = T.build_sampler(cfg, progress=False, model=model).samplers[0]
    sampler = cache.sampler
    assert cache.cached_masks == sum(len(sampler.drawable_masks(s)) for s in sampler.train_ids)
    stored = load_file(next(cache.store.glob("*.safetensors")))
    copies = sorted(k for k in stored if k.startswith("latents"))
    assert len(copies) == 3 and all(stored[k].shape == stored["latents"].shape for k in copies)
    assert all(not torch.allclose(stored[k].float(), stored["latents"].float(), atol=1e-2) for k in copies[1:])

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded although everything was prefilled")

    monkeypatch.setattr(model, "encode_masks", no_encoding)
    batch = cache.sample(16, torch.Generator().manual_seed(3))
    plain = T.build_sampler(dataclasses.replace(cfg, cache_bank=0, cache_prefill=False),
                            progress=False, model=model).samplers[0].sample(16, torch.Generator().manual_seed(3))
    same = [torch.equal(batch["query_latents"][i], plain["query_latents"][i]) for i in range(16)]
    assert any(same) and not all(same)  # some images drawn from the bank's copies
    monkeypatch.setattr(model, "encode_images_and_features", no_encoding)
    again = T.build_sampler(cfg, progress=False, model=model).samplers[0].sample(16, torch.Generator().manual_seed(3))
    assert all(torch.equal(again[k], batch[k]) for k in batch)
    with pytest.raises(ValueError, match="cache_bank"):
        dataclasses.replace(cfg, cache_latents=False, cache_dir="")
    # another intensity recipe (the random curve) adds its own copies; the first bank stays as it was
    monkeypatch.undo()
    curve = tiny_cfg(Path("unused"), prepared, *bank, "episodes.augment.remap=1.0")
    T.build_sampler(curve, progress=False, model=model).samplers[0].sample(4, torch.Generator().manual_seed(3))
    both = load_file(next(cache.store.glob("*.safetensors")))
    assert len([k for k in both if k.startswith("latents")]) == 5
    assert all(torch.equal(both[k], stored[k]) for k in copies)


def test_bf16_encodings_agree_with_fp32_and_have_their_own_store(prepared, tmp_path):
    from sdfsmis.models import build

    cfgs = [tiny_cfg(Path("unused"), prepared, "episodes.augment_which=none", "cache_latents=true",
                     f"cache_dir={tmp_path / 'cache'}", f"mixed_precision={p}") for p in ("no", "bf16")]
    torch.manual_seed(0)
    model = build(cfgs[0].model).eval()
    fp32, bf16 = (T.build_sampler(c, progress=False, model=model).samplers[0] for c in cfgs)
    assert fp32.store != bf16.store
    a, b = (s.sample(4, torch.Generator().manual_seed(1)) for s in (fp32, bf16))
    for key in ("query_latents", "query_mask_latents"):
        assert float((a[key] - b[key]).norm() / a[key].norm()) < 0.05


def test_config_error_leaves_nothing(tmp_path):
    """A run that fails before its first checkpoint (here: a data folder that is not a prepared
    dataset) removes the out_dir it created; an existing out_dir is left alone."""
    cfg = tiny_cfg(tmp_path / "run", tmp_path / "missing")
    with pytest.raises(InputError):
        T.train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(InputError):
        T.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "kept")), progress=False)
    assert (tmp_path / "kept").is_dir()
