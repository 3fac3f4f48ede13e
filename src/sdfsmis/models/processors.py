"""Attention processors that let a query branch read from a support branch inside one UNet.

Two interactions, both installed with ``unet.set_attn_processor`` on the self-attention (``attn1``)
of every ``BasicTransformerBlock``; every other attention keeps its processor:

- **SII** (SD-FSMIS, paper eq. 1): the query tokens go
  ``SelfAttn -> CrossAttn(support tokens) -> CrossAttn(E) -> FFN``, each with its residual. The
  support cross-attention is a trainable :class:`SupportCrossAttention` per block (a copy of the
  block's ``norm1`` and ``attn1``). A forward pre-hook on the block stores the block input ``h``; the
  ``attn1`` processor returns ``sa + [SII(norm(h_q + sa_q), S), 0]`` so that the block's own residual
  yields ``h + sa + SII(...)``, the exact sequential form. ``S`` = the support rows' tokens at the
  same point, ``norm(h_s + sa_s)``, with the K shots concatenated along the sequence.
- **KV fusion** (DiffewS): the query tokens attend over ``[K_q; K_s1..K_sK]``, ``[V_q; V_s1..V_sK]``
  with the block's own projections (no new parameters); support tokens do plain self-attention.

The support branch never reads from the query, so it can be computed once and reused.
:class:`BranchContext` holds the batch layout and the mode:

- ``"joint"``: the batch is ``[query (B rows); support (B*K rows, episode-major)]``;
- ``"record"``: the batch holds support rows only (S sets of K shots); each block stores what the
  query needs (SII: K/V projections of the support tokens; KV fusion: the support K and V);
- ``"replay"``: the batch holds query rows only and reads the stored tensors (one support set shared
  by all queries, or one set per query).

:class:`DualConvIn` replaces ``unet.conv_in``: the query rows go through the query conv and the
support rows through the support conv. Each conv reads the first ``in_channels`` channels of its
rows, so a 4-channel query (DiffewS) sits zero-padded in an 8-channel joint batch and its conv keeps
the original 4-channel weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn

Mode = Literal["joint", "record", "replay"]


@dataclass
class BranchContext:
    """Batch layout and mode shared by the processors and :class:`DualConvIn` of one model.

    ``n_query``: query rows at the front of a joint batch; ``shots``: support rows per query (K).
    ``store``: per-block tensors written in ``record`` mode and read in ``replay`` mode.
    """

    mode: Mode = "replay"
    n_query: int = 0
    shots: int = 1
    store: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def split(self, rows: int) -> tuple[int, int]:
        """(query rows, support rows) of a batch of ``rows`` rows in the current mode."""
        if self.mode == "joint":
            if rows != self.n_query * (1 + self.shots):
                raise ValueError(f"joint batch of {rows} rows, expected {self.n_query} x (1 + {self.shots})")
            return self.n_query, rows - self.n_query
        if self.mode == "record":
            return 0, rows
        return rows, 0

    def set(self, mode: Mode, n_query: int = 0, shots: int = 1) -> BranchContext:
        """Set the layout for the next UNet call(s); ``record`` clears the store first.

        The layout is deliberately not restored afterwards: with gradient checkpointing the blocks
        are re-run during ``backward`` and must see the layout of their forward pass.
        """
        if mode not in ("joint", "record", "replay"):
            raise ValueError(f"unknown mode {mode!r}")
        if mode == "joint" and (n_query < 1 or shots < 1):
            raise ValueError("joint mode needs n_query >= 1 and shots >= 1")
        self.mode, self.n_query, self.shots = mode, n_query, shots
        if mode == "record":
            self.store = {}
        return self


# ---------------------------------------------------------------------------------------------
# Attention helpers (the parts of diffusers' AttnProcessor2_0 that SD's self-attention uses)
# ---------------------------------------------------------------------------------------------


def _check_plain(attn: Attention) -> None:
    """The processors support the plain SD self-attention (no group/spatial/qk norm, no residual)."""
    if (attn.group_norm is not None or attn.spatial_norm is not None or attn.norm_q is not None
            or attn.norm_k is not None or attn.residual_connection or attn.rescale_output_factor != 1.0):
        raise NotImplementedError("only plain SD self-attention layers can take support processors")


def _heads(attn: Attention, x: Tensor) -> Tensor:
    """[B, L, h*d] -> [B, h, L, d]."""
    return x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """[B, h, L, d] -> [B, L, h*d]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _project_out(attn: Attention, x: Tensor) -> Tensor:
    """[B, h, L, d] -> output projection (+ dropout) -> [B, L, C]."""
    return attn.to_out[1](attn.to_out[0](_merge(x)))


def _shots_to_sequence(x: Tensor, shots: int) -> Tensor:
    """[S*K, h, L, d] (set-major) -> [S, h, K*L, d]: the K shots of a set side by side."""
    sk, h, length, d = x.shape
    return x.view(sk // shots, shots, h, length, d).permute(0, 2, 1, 3, 4).reshape(sk // shots, h, shots * length, d)


def _match_rows(x: Tensor, rows: int) -> Tensor:
    """Stored support tensor with S rows -> ``rows`` rows (S == 1 broadcasts, S == rows pairs)."""
    if x.shape[0] == rows:
        return x
    if x.shape[0] == 1:
        return x.expand(rows, *x.shape[1:])
    raise ValueError(f"stored support has {x.shape[0]} sets, cannot serve {rows} queries")


def _fetch(ctx: BranchContext, key: str) -> tuple[Tensor, Tensor]:
    try:
        return ctx.store[key]
    except KeyError:
        raise RuntimeError("replay without a recorded support (call prepare_support first)") from None


# ---------------------------------------------------------------------------------------------
# SII
# ---------------------------------------------------------------------------------------------


class SupportCrossAttention(nn.Module):
    """The trainable support cross-attention of one block: copies of ``norm1`` and ``attn1``.

    Tokens ``x`` [B, L, C] attend to ``norm(support tokens)`` through ``attn``'s projections.
    """

    def __init__(self, block: BasicTransformerBlock):
        super().__init__()
        if not isinstance(block.norm1, nn.LayerNorm):
            raise NotImplementedError("SII supports BasicTransformerBlocks with norm_type='layer_norm'")
        _check_plain(block.attn1)
        self.norm = copy.deepcopy(block.norm1)
        self.attn = copy.deepcopy(block.attn1)
        self.attn.set_processor(AttnProcessor2_0())
        for p in self.parameters():
            p.requires_grad_(True)

    def support_kv(self, support_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-norm support tokens [S, M, C] -> K, V [S, h, M, d]."""
        s = self.norm(support_tokens)
        return _heads(self.attn, self.attn.to_k(s)), _heads(self.attn, self.attn.to_v(s))

    def attend(self, tokens: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Pre-norm query tokens [B, L, C] and support K/V [B, h, M, d] -> [B, L, C]."""
        q = _heads(self.attn, self.attn.to_q(self.norm(tokens)))
        return _project_out(self.attn, F.scaled_dot_product_attention(q, k, v))


def _self_attention(attn: Attention, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Plain self-attention; returns (output [B, L, C], q, k, v [B, h, L, d])."""
    q, k, v = (_heads(attn, proj(x)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    return _project_out(attn, F.scaled_dot_product_attention(q, k, v)), q, k, v


class _CountingProcessor:
    """Base: counts its calls (``calls``) and rejects inputs the support processors do not handle."""

    def __init__(self, ctx: BranchContext, key: str):
        self.ctx = ctx
        self.key = key
        self.calls = 0

    def _check_call(self, encoder_hidden_states: Tensor | None, attention_mask: Tensor | None,
                    hidden_states: Tensor) -> None:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise NotImplementedError("support processors handle unmasked self-attention on [B, L, C] tokens")
        self.calls += 1


class SIIProcessor(_CountingProcessor):
    """``attn1`` processor of one block implementing Support Information Injection."""

    def __init__(self, ctx: BranchContext, key: str, layer: SupportCrossAttention):
        super().__init__(ctx, key)
        self.layer = layer
        self.block_input: Tensor | None = None

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the block: remember its input hidden states."""
        self.block_input = args[0] if args else kwargs["hidden_states"]

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        self._check_call(encoder_hidden_states, attention_mask, hidden_states)
        h, self.block_input = self.block_input, None
        if h is None or h.shape != hidden_states.shape:
            raise RuntimeError("SII processor called without its block's input (pre-hook missing)")
        sa, _, _, _ = _self_attention(attn, hidden_states)
        ctx = self.ctx
        if ctx.mode == "replay":
            k, v = (_match_rows(t, sa.shape[0]) for t in _fetch(ctx, self.key))
            return sa + self.layer.attend(h + sa, k, v)
        nq, _ = ctx.split(sa.shape[0])
        support = (h[nq:] + sa[nq:])
        rows, length, channels = support.shape
        support = support.reshape(rows // ctx.shots, ctx.shots * length, channels)  # shots side by side
        k, v = self.layer.support_kv(support)
        if ctx.mode == "record":
            ctx.store[self.key] = (k, v)
            return sa
        injected = self.layer.attend(h[:nq] + sa[:nq], k, v)
        return torch.cat([sa[:nq] + injected, sa[nq:]])


class KVFusionProcessor(_CountingProcessor):
    """``attn1`` processor of one block implementing DiffewS KV fusion (no parameters)."""

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        self._check_call(encoder_hidden_states, attention_mask, hidden_states)
        ctx = self.ctx
        q, k, v = (_heads(attn, proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if ctx.mode == "replay":
            ks, vs = (_match_rows(t, q.shape[0]) for t in _fetch(ctx, self.key))
            out = F.scaled_dot_product_attention(q, torch.cat([k, ks], 2), torch.cat([v, vs], 2))
            return _project_out(attn, out)
        nq, _ = ctx.split(q.shape[0])
        out_s = F.scaled_dot_product_attention(q[nq:], k[nq:], v[nq:])
        ks, vs = _shots_to_sequence(k[nq:], ctx.shots), _shots_to_sequence(v[nq:], ctx.shots)
        if ctx.mode == "record":
            ctx.store[self.key] = (ks, vs)
            return _project_out(attn, out_s)
        out_q = F.scaled_dot_product_attention(q[:nq], torch.cat([k[:nq], ks], 2), torch.cat([v[:nq], vs], 2))
        return _project_out(attn, torch.cat([out_q, out_s]))


# ---------------------------------------------------------------------------------------------
# Installation
# ---------------------------------------------------------------------------------------------


def transformer_blocks(unet: nn.Module) -> list[tuple[str, BasicTransformerBlock]]:
    """(module path, block) of every BasicTransformerBlock of ``unet``, in module order."""
    return [(name, m) for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]


def layer_key(block_path: str) -> str:
    """Module path -> a ``ModuleDict`` key (dots are not allowed there)."""
    return block_path.replace(".", "__")


def make_sii_layers(unet: nn.Module) -> nn.ModuleDict:
    """One :class:`SupportCrossAttention` per transformer block, initialised from its attn1/norm1."""
    return nn.ModuleDict({layer_key(path): SupportCrossAttention(block) for path, block in transformer_blocks(unet)})


def _install(unet: nn.Module, processors: dict[str, object]) -> None:
    """Set the given ``attn1`` processors; every other attention keeps its current processor."""
    current = dict(unet.attn_processors)
    missing = set(processors) - set(current)
    if missing:
        raise KeyError(f"no attention processor at {sorted(missing)[:3]}")
    current.update(processors)
    unet.set_attn_processor(current)


def install_sii(unet: nn.Module, layers: nn.ModuleDict, ctx: BranchContext) -> list[SIIProcessor]:
    """Install SII processors (+ block pre-hooks) on every transformer block; returns them in order."""
    procs: list[SIIProcessor] = []
    mapping: dict[str, object] = {}
    for path, block in transformer_blocks(unet):
        key = layer_key(path)
        proc = SIIProcessor(ctx, key, layers[key])
        block.register_forward_pre_hook(proc.pre_hook, with_kwargs=True)
        mapping[f"{path}.attn1.processor"] = proc
        procs.append(proc)
    _install(unet, mapping)
    return procs


def install_kv_fusion(unet: nn.Module, ctx: BranchContext) -> list[KVFusionProcessor]:
    """Install KV-fusion processors on every transformer block's attn1; returns them in order."""
    procs: list[KVFusionProcessor] = []
    mapping: dict[str, object] = {}
    for path, block in transformer_blocks(unet):
        _check_plain(block.attn1)
        proc = KVFusionProcessor(ctx, layer_key(path))
        mapping[f"{path}.attn1.processor"] = proc
        procs.append(proc)
    _install(unet, mapping)
    return procs


class DualConvIn(nn.Module):
    """Replacement for ``unet.conv_in``: query rows -> ``query`` conv, support rows -> ``support`` conv.

    Input [rows, C_max, h, w]; each conv reads its first ``in_channels`` channels. The split of the
    rows comes from the :class:`BranchContext` (joint: ``n_query`` first; record: all support;
    replay: all query). ``support`` may be ``None`` for a model without a support branch.
    """

    def __init__(self, query: nn.Conv2d, support: nn.Conv2d | None, ctx: BranchContext):
        super().__init__()
        self.query = query
        self.support = support
        self.ctx = ctx

    @property
    def in_channels(self) -> int:
        return max(self.query.in_channels, self.support.in_channels if self.support is not None else 0)

    def forward(self, x: Tensor) -> Tensor:
        nq, ns = self.ctx.split(x.shape[0])
        parts = []
        if nq:
            parts.append(self.query(x[:nq, : self.query.in_channels]))
        if ns:
            if self.support is None:
                raise RuntimeError("this model has no support branch")
            parts.append(self.support(x[nq:, : self.support.in_channels]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def pad_channels(x: Tensor, channels: int) -> Tensor:
    """Zero-pad [B, C, h, w] to ``channels`` channels (for stacking branches of unequal width)."""
    if x.shape[1] == channels:
        return x
    return F.pad(x, (0, 0, 0, 0, 0, channels - x.shape[1]))
