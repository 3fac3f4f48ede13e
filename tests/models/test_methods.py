"""SD-FSMIS, DiffewS and SDSeg on the tiny tier (CPU, seeded, 32x32 images, 4x4 latents)."""

from __future__ import annotations


import pytest
import torch

from sdfsmis.models import BackboneConfig, ModelConfig, build
from sdfsmis.models.base import EncodedEpisode
from sdfsmis.models.config import apply_threshold
from sdfsmis.models.diffews import DiffewS
from sdfsmis.models.predictor import ModelPredictor
from sdfsmis.models.sdfsmis import SDFSMIS, query_enhancement, support_prototype
from sdfsmis.models.sdseg import SDSeg

S = 32  # tiny-tier image size


def _model(method: str = "sdfsmis", **kw):
    return build(ModelConfig(method=method, backbone=BackboneConfig(tier="tiny", seed=0), **kw)).eval()


def _episode(b: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(b, 1, S, S, generator=g) * 2 - 1
    s = torch.rand(b, k, 1, S, S, generator=g) * 2 - 1
    m = torch.zeros(b, k, 1, S, S)
    m[..., 8:24, 6:22] = 1
    qm = torch.zeros(b, 1, S, S)
    qm[..., 10:26, 8:20] = 1
    return q, s, m, qm


@pytest.mark.parametrize("method", ["sdfsmis", "diffews", "sdseg"])
@pytest.mark.parametrize("k", [1, 3])
def test_shapes_and_ranges(method, k):
    model = _model(method)
    q, s, m, qm = _episode(2, k)
    with torch.no_grad():
        prob = model(q, s, m)
        hard = model.segment(q, s, m)
    assert prob.shape == hard.shape == (2, 1, S, S)
    # the masks are the probabilities cut by the method's own rule
    rule, value = model.config.threshold, model.config.threshold_value
    cut = (value + 1) / 2 if rule == "absolute" else value * prob.amax(dim=(-2, -1), keepdim=True)
    assert torch.equal(hard, (prob > cut).float())
    if method != "sdseg":  # probability = the decoded latent, channel-averaged, from [-1, 1] to [0, 1]
        with torch.no_grad():
            z = model.predict_latents(model.encode_episode(q, s, m))
            image = model.vae.model.decode(z / model.vae.scaling_factor).sample.clamp(-1, 1)
        torch.testing.assert_close(prob, image.mean(1, keepdim=True).add(1).div(2))
    model.train()
    loss = model.training_loss({"query_images": q, "support_images": s, "support_masks": m, "query_masks": qm})
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters())


@pytest.mark.parametrize("method", ["sdfsmis", "diffews"])
def test_interaction_runs_in_every_transformer_block(method):
    from sdfsmis.models.processors import transformer_blocks

    model = _model(method)
    procs = model.sii_processors if method == "sdfsmis" else model.kv_processors
    assert len(procs) == len(transformer_blocks(model.unet)) >= 3
    q, s, m, _ = _episode(2, 3)
    with torch.no_grad():
        model(q, s, m)
    assert [p.calls for p in procs] == [1] * len(procs)


@pytest.mark.parametrize("method", ["sdfsmis", "diffews"])
@pytest.mark.parametrize("k", [1, 3])
def test_fast_path_equals_joint_path(method, k):
    model = _model(method)
    q, s, m, _ = _episode(4, k, seed=3)  # 4 queries sharing the first support set
    s1, m1 = s[:1], m[:1]
    with torch.no_grad():
        joint = model.predict_latents(model.encode_episode(q, s1.expand(4, -1, -1, -1, -1), m1.expand(4, -1, -1, -1, -1)))
        cache = model.prepare_support(s1[0], m1[0])
        fast = model.predict_latents_with_support(model.encode_images(q), cache)
        prob_fast = model.predict_with_support(q, cache)
        prob_joint = model(q, s1.expand(4, -1, -1, -1, -1), m1.expand(4, -1, -1, -1, -1))
    assert cache.shots == k
    torch.testing.assert_close(fast, joint, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(prob_fast, prob_joint, atol=1e-4, rtol=1e-4)
    # the support really matters: another support set changes the prediction
    with torch.no_grad():
        other = model.predict_latents_with_support(model.encode_images(q), model.prepare_support(-s1[0], 1 - m1[0]))
    assert (other - fast).abs().max() > 1e-4


def test_each_ablation_switch_changes_the_output():
    q, s, m, _ = _episode(2, 1)
    with torch.no_grad():
        base = _model()
        full = base.predict_latents(base.encode_episode(q, s, m))
        outs = {}
        for switch in ("sii", "qe", "vtct"):
            model = _model(**{switch: False})
            outs[switch] = model.predict_latents(model.encode_episode(q, s, m))
    for switch, out in outs.items():
        assert (out - full).abs().max() > 1e-4, switch


def test_switches_remove_the_support_pathways():
    """sii only: the support branch is the sole route; all off: the support is ignored."""
    q, s, m, _ = _episode(2, 1)
    s2, m2 = -s, 1 - m
    with torch.no_grad():
        none = _model(sii=False, qe=False, vtct=False)
        assert not none.has_support_branch and none.unet.conv_in.support is None
        torch.testing.assert_close(none(q, s, m), none(q, s2, m2))
        sii_only = _model(qe=False, vtct=False)
        assert (sii_only(q, s, m) - sii_only(q, s2, m2)).abs().max() > 1e-4
        # without QE the query conv is the pretrained 4-channel conv
        assert sii_only.unet.conv_in.query.in_channels == 4
        assert _model().unet.conv_in.query.in_channels == 8


def test_query_enhancement_and_fallback_counter():
    v = torch.tensor([1.0, 2.0, -1.0, 0.5])
    z_si = v.view(1, 1, 4, 1, 1).expand(2, 1, 4, 4, 4).clone()
    masks = torch.ones(2, 1, 1, S, S)
    torch.testing.assert_close(support_prototype(z_si, masks), v.expand(2, 4))
    # query 0: half of the positions equal v (pass), half -v; query 1: all -v (none pass tau)
    z_qi = -v.view(1, 4, 1, 1).expand(2, 4, 4, 4).clone()
    z_qi[0, :, :2] = v.view(4, 1, 1) * 3
    p_q, fallback = query_enhancement(z_qi, v.expand(2, 4), 0.7)
    assert fallback.tolist() == [False, True]
    torch.testing.assert_close(p_q[0], 3 * v)
    torch.testing.assert_close(p_q[1], v)

    model = _model()
    ep = EncodedEpisode(z_qi, z_si, z_si.clone(), masks, torch.ones(2, 1, model.image_encoder.dim, 4, 4))
    with torch.no_grad():
        model.predict_latents(ep)
    assert int(model.qe_calls) == 2 and int(model.qe_fallbacks) == 1
    assert model.qe_fallback_rate == 0.5
    model.reset_qe_counters()
    assert int(model.qe_calls) == 0


def test_parameter_groups_split_new_layers():
    model = _model()
    groups = {g["name"]: g for g in model.parameter_groups(1e-5, 5e-5)}
    assert groups["backbone"]["lr"] == 1e-5 and groups["new"]["lr"] == 5e-5
    new_ids = {id(p) for p in groups["new"]["params"]}
    for module in (model.sii_layers, model.vtct, model.unet.conv_in):
        assert all(id(p) in new_ids for p in module.parameters())
    all_trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert new_ids | {id(p) for p in groups["backbone"]["params"]} == all_trainable
    assert not any(p.requires_grad for p in model.vae.parameters())
    diffews = _model("diffews")
    dg = {g["name"]: g for g in diffews.parameter_groups(1.0, 2.0)}
    assert len(dg["new"]["params"]) == 2  # the support conv's weight and bias: KV fusion adds nothing


def test_thresholds():
    prob = torch.tensor([[[0.1, 0.3], [0.6, 0.9]]])
    assert apply_threshold(prob, "absolute", 0.0).tolist() == [[[0, 0], [1, 1]]]
    assert apply_threshold(prob, "relative", 0.25).tolist() == [[[0, 1], [1, 1]]]
    assert apply_threshold(torch.zeros(1, 2, 2), "relative", 0.25).sum() == 0
    assert _model("diffews").config.threshold == "relative"
    assert _model().config.threshold == "absolute"


def test_tiny_model_overfits_one_episode():
    torch.manual_seed(0)
    model = _model().train()
    q, s, m, qm = _episode(1, 1)
    with torch.no_grad():  # cached latents, as the CPU training path uses
        ep = model.episode_from_batch({"query_images": q, "support_images": s, "support_masks": m})
        batch = {"query_latents": ep.z_qi, "support_latents": ep.z_si, "support_mask_latents": ep.z_sm,
                 "support_masks": m, "support_features": ep.support_features,
                 "query_mask_latents": model.encode_masks(qm)}
    opt = torch.optim.AdamW(model.parameter_groups(1e-3, 1e-3), weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = model.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_gradient_checkpointing_gives_the_same_gradients():
    q, s, m, qm = _episode(2, 2)
    batch = {"query_images": q, "support_images": s, "support_masks": m, "query_masks": qm}
    grads = []
    for ckpt in (False, True):
        model = _model().train()
        if ckpt:
            model.unet.enable_gradient_checkpointing()
        model.training_loss(batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.sii_layers.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_sdseg_one_step_inference_is_seeded():
    model = _model("sdseg")
    q, _, _, qm = _episode(2, 1)
    with torch.no_grad():
        a, b = model(q), model(q)
        c = model(q, generator=torch.Generator().manual_seed(7))
        d = model(q, generator=torch.Generator().manual_seed(7))
        single = model(q[1:])
    assert a.shape == (2, 1, S, S)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(single, a[1:])  # the default noise does not depend on the batch
    torch.testing.assert_close(c, d)
    assert (a - c).abs().max() > 0  # different noise, different sample
    loss = model.training_loss({"query_images": q, "query_masks": qm}, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    # z_c channels of conv_in start at zero, the z_t channels keep the pretrained weights
    assert model.unet.conv_in.weight[:, 4:].abs().sum() == 0
    stab = model.stability(q, n_runs=3, generator=torch.Generator().manual_seed(1))
    assert stab["lpips"] is None and 0 < stab["score"]["ssim"] <= 1 and stab["score"]["psnr"] > 0


def test_sdseg_latent_estimate_inverts_add_noise():
    model = _model("sdseg")
    z0, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 500, 999])
    z_t = model.scheduler.add_noise(z0, eps, t)
    torch.testing.assert_close(model.latent_estimate(z_t, eps, t), z0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["sdfsmis", "diffews", "sdseg"])
def test_predictor_native_size_and_fast_equals_slow(method):
    model = _model(method)
    g = torch.Generator().manual_seed(5)
    sup = torch.rand(2, 40, 36, generator=g) * 2 - 1
    msk = torch.zeros(2, 40, 36)
    msk[:, 10:30, 8:28] = 1
    qry = torch.rand(5, 40, 36, generator=g) * 2 - 1
    fast = ModelPredictor(model, batch_size=2, fast=True, precision="fp32")  # paths compared exactly
    slow = ModelPredictor(model, batch_size=3, fast=False, precision="fp32")
    out = fast.predict(sup, msk, qry)
    assert out.shape == (5, 40, 36) and out.dtype == torch.float32
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(fast.probabilities(sup, msk, qry), slow.probabilities(sup, msk, qry),
                               atol=1e-4, rtol=1e-4)
    assert fast.name == method


def test_model_classes():
    assert isinstance(_model(), SDFSMIS) and isinstance(_model("diffews"), DiffewS)
    assert isinstance(_model("sdseg"), SDSeg)
    with pytest.raises(ValueError):
        SDFSMIS(ModelConfig(method="diffews", backbone=BackboneConfig(tier="tiny")))
