"""SII and KV-fusion attention processors against hand-written references (one block, CPU)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from sdfsmis.models.processors import (
    BranchContext,
    DualConvIn,
    KVFusionProcessor,
    SIIProcessor,
    SupportCrossAttention,
    install_kv_fusion,
    install_sii,
    make_sii_layers,
    pad_channels,
    transformer_blocks,
)

DIM, HEADS, CROSS, L = 8, 2, 6, 5


def _block(seed: int = 0) -> BasicTransformerBlock:
    torch.manual_seed(seed)
    block = BasicTransformerBlock(DIM, HEADS, DIM // HEADS, cross_attention_dim=CROSS)
    for p in block.parameters():  # non-trivial norms and biases
        nn.init.normal_(p, std=0.3)
    return block.eval()


class _Holder(nn.Module):
    """A module with one transformer block, so the install helpers can find it by path."""

    def __init__(self, block: BasicTransformerBlock):
        super().__init__()
        self.block = block

    @property
    def attn_processors(self):
        return {"block.attn1.processor": self.block.attn1.processor, "block.attn2.processor": self.block.attn2.processor}

    def set_attn_processor(self, procs):
        self.block.attn1.set_processor(procs["block.attn1.processor"])
        self.block.attn2.set_processor(procs["block.attn2.processor"])


def _attend(attn, x, kv):
    """Reference multi-head attention of tokens x [B, L, C] over kv [B, M, C] with attn's weights."""
    q, k, v = attn.to_q(x), attn.to_k(kv), attn.to_v(kv)
    split = lambda t: t.view(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)  # noqa: E731
    w = (split(q) @ split(k).transpose(-1, -2) / (DIM // HEADS) ** 0.5).softmax(-1)
    o = (w @ split(v)).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return attn.to_out[0](o)


def _data(nq: int, k: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(nq * (1 + k), L, DIM, generator=g)
    e = torch.randn(nq * (1 + k), 1, CROSS, generator=g)
    return h, e


def _sii_reference(block, layer, h, e, nq, k):
    """Paper eq. 1 written out: SelfAttn -> CrossAttn(support) -> CrossAttn(E) -> FFN, residuals."""
    x = h + _attend(block.attn1, block.norm1(h), block.norm1(h))
    sup = x[nq:].reshape(nq, k * L, DIM)
    xq = x[:nq] + _attend(layer.attn, layer.norm(x[:nq]), layer.norm(sup))
    x = torch.cat([xq, x[nq:]])
    x = x + _attend(block.attn2, block.norm2(x), e)
    return x + block.ff(block.norm3(x))


@pytest.mark.parametrize("k", [1, 3])
def test_sii_block_matches_sequential_reference(k):
    block = _block()
    holder = _Holder(block)
    layers = make_sii_layers(holder)
    layer = layers["block"]
    for p in layer.parameters():  # SII weights differ from attn1 after training; make them differ here
        nn.init.normal_(p, std=0.3)
    ctx = BranchContext()
    (proc,) = install_sii(holder, layers, ctx)
    assert isinstance(block.attn2.processor, AttnProcessor2_0)  # attn2 keeps the default
    nq = 2
    h, e = _data(nq, k)
    ctx.set("joint", n_query=nq, shots=k)
    with torch.no_grad():
        out = block(h, encoder_hidden_states=e)
        ref = _sii_reference(block, layer, h, e, nq, k)
        # support rows run the block unchanged
        plain = _block()(h[nq:], encoder_hidden_states=e[nq:])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[nq:], plain, atol=1e-5, rtol=1e-5)
    assert proc.calls == 1


def test_sii_layer_initialised_from_attn1():
    block = _block()
    layer = SupportCrossAttention(block)
    for name, p in block.attn1.named_parameters():
        assert torch.equal(p, dict(layer.attn.named_parameters())[name])
    assert torch.equal(layer.norm.weight, block.norm1.weight)
    assert layer.norm.weight.data_ptr() != block.norm1.weight.data_ptr()
    assert all(p.requires_grad for p in layer.parameters())


def _kv_reference(attn, x, nq, k):
    q_rows, s_rows = x[:nq], x[nq:]
    sup = s_rows.reshape(nq, k * L, DIM)
    out_q = _attend(attn, q_rows, torch.cat([q_rows, sup], 1))
    out_s = _attend(attn, s_rows, s_rows)
    return torch.cat([out_q, out_s])


@pytest.mark.parametrize("k", [1, 3])
def test_kv_fusion_matches_reference(k):
    block = _block()
    holder = _Holder(block)
    ctx = BranchContext()
    (proc,) = install_kv_fusion(holder, ctx)
    nq = 2
    x, _ = _data(nq, k)
    ctx.set("joint", n_query=nq, shots=k)
    with torch.no_grad():
        out = block.attn1(x)
        ref = _kv_reference(block.attn1, x, nq, k)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert proc.calls == 1 and isinstance(proc, KVFusionProcessor)
    assert sum(p.numel() for p in holder.parameters()) == sum(p.numel() for p in _block().parameters())


@pytest.mark.parametrize("kind", ["sii", "kv"])
@pytest.mark.parametrize("k", [1, 3])
def test_record_replay_equals_joint(kind, k):
    """One support set recorded once and replayed for several queries == the joint batch."""
    block = _block()
    holder = _Holder(block)
    ctx = BranchContext()
    if kind == "sii":
        install_sii(holder, make_sii_layers(holder), ctx)
    else:
        install_kv_fusion(holder, ctx)
    nq = 3
    g = torch.Generator().manual_seed(2)
    queries = torch.randn(nq, L, DIM, generator=g)
    support = torch.randn(k, L, DIM, generator=g)
    e = torch.randn(1, 1, CROSS, generator=g)
    joint_in = torch.cat([queries, support.repeat(nq, 1, 1)])
    with torch.no_grad():
        ctx.set("joint", n_query=nq, shots=k)
        joint = block(joint_in, encoder_hidden_states=e.expand(nq * (1 + k), -1, -1))[:nq]
        ctx.set("record", shots=k)
        block(support, encoder_hidden_states=e.expand(k, -1, -1))
        assert set(ctx.store) == {"block"}
        ctx.set("replay")
        fast = block(queries, encoder_hidden_states=e.expand(nq, -1, -1))
    torch.testing.assert_close(fast, joint, atol=1e-5, rtol=1e-5)


def test_replay_without_record_fails():
    block = _block()
    holder = _Holder(block)
    ctx = BranchContext()
    install_kv_fusion(holder, ctx)
    ctx.set("replay")
    with pytest.raises(RuntimeError, match="prepare_support"):
        block.attn1(torch.randn(1, L, DIM))


def test_joint_layout_is_checked():
    ctx = BranchContext()
    ctx.set("joint", n_query=2, shots=3)
    assert ctx.split(8) == (2, 6)
    with pytest.raises(ValueError):
        ctx.split(7)
    assert ctx.set("record").split(5) == (0, 5)
    assert ctx.set("replay").split(5) == (5, 0)


def test_dual_conv_in_routes_rows():
    torch.manual_seed(0)
    ctx = BranchContext()
    q, s = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
    conv = DualConvIn(q, s, ctx)
    zq, zs = torch.randn(2, 4, 5, 5), torch.randn(4, 8, 5, 5)
    ctx.set("joint", n_query=2, shots=2)
    out = conv(torch.cat([pad_channels(zq, 8), zs]))
    torch.testing.assert_close(out[:2], q(zq))
    torch.testing.assert_close(out[2:], s(zs))
    ctx.set("record")
    torch.testing.assert_close(conv(zs), s(zs))
    ctx.set("replay")
    torch.testing.assert_close(conv(zq), q(zq))


def test_processors_cover_every_block_of_a_unet():
    from sdfsmis.models.backbones import random_unet, unet_config

    unet = random_unet(unet_config("tiny"), seed=0)
    blocks = transformer_blocks(unet)
    assert len(blocks) >= 3
    ctx = BranchContext()
    procs = install_sii(unet, make_sii_layers(unet), ctx)
    assert len(procs) == len(blocks)
    for path, block in blocks:
        assert isinstance(block.attn1.processor, SIIProcessor)
        assert isinstance(block.attn2.processor, AttnProcessor2_0)
    ctx.set("joint", n_query=1, shots=2)
    with torch.no_grad():
        unet(torch.randn(3, 4, 4, 4), 999, encoder_hidden_states=torch.randn(3, 1, 16))
    assert [p.calls for p in procs] == [1] * len(blocks)
