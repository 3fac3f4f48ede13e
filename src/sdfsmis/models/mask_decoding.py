"""Decoding predicted mask latents with TAESD, computing the full-resolution stages only near the mask.

A predicted mask latent equals the background latent (the encoding of an empty mask) except around
the organ, and the decoder maps background latents to background. TAESD's decoder is a plain stack
of 3x3 convolutions, ReLUs and nearest-neighbour upsampling: every output pixel depends only on a
window of the features before a stage, of a radius fixed by the stage's layers. So:

1. the decoder's early, low-resolution layers run on the whole latent;
2. per slice, the latent positions farther than ``LATENT_DISTANCE`` from the background latent
   (widened by ``LATENT_DILATION`` positions) give a bounding box of the pixels that may differ from
   the background;
3. the remaining, high-resolution layers (most of the work) run on a window of the features around
   that box, widened by their receptive radius, so every pixel of the box (and of the window's
   interior) is exactly what the full decoder gives; elsewhere the decoded empty mask is used;
4. a slice whose window edge is not background (the mask continues past the window) or whose window
   covers most of the slice is decoded whole.

Windows of one batch share one size (each placed around its slice's box), so they run as one batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: A latent position differs from the background when its distance (L2 over channels) to the
#: background latent exceeds this (SD-scaled latents; background positions lie within about 0.5).
LATENT_DISTANCE = 1.0
#: Latent positions added around the differing ones.
LATENT_DILATION = 1
#: A window edge value above this ([-1, 1] scale, channel mean; the decoded empty mask is below
#: -0.99) means the mask may reach past the window: that slice is decoded whole.
EDGE_LEVEL = -0.96
#: A window covering more than this fraction of the features is not worth cropping.
MAX_WINDOW_FRACTION = 0.85


def receptive_radius(layers: Sequence[nn.Module]) -> int | None:
    """Radius, in pixels of the input of ``layers``, of the window each output pixel depends on;
    ``None`` when a layer is not a stride-1 convolution, an elementwise layer or a nearest upsampling
    by an integer factor (then the layers cannot run on windows)."""
    radius = 0
    for layer in reversed(list(layers)):
        if isinstance(layer, nn.Upsample):
            factor = layer.scale_factor
            factor = factor[0] if isinstance(factor, tuple) else factor
            if layer.mode != "nearest" or factor is None or float(factor) != int(factor):
                return None
            radius = math.ceil(radius / int(factor))
            continue
        for m in layer.modules():
            if isinstance(m, nn.Conv2d):
                if m.stride != (1, 1) or m.kernel_size[0] != m.kernel_size[1] or m.padding_mode != "zeros":
                    return None
                radius += (m.kernel_size[0] // 2) * m.dilation[0]
            elif isinstance(m, (nn.Upsample, nn.MaxPool2d, nn.AvgPool2d, nn.GroupNorm, nn.BatchNorm2d)):
                return None
    return radius


def _ranges(need: Tensor, size: int, radius: int, scale: int) -> Tensor:
    """Needed output ranges ``[N, 2]`` (start, stop in output pixels) on one axis -> the feature
    ranges ``[N, 2]`` that give them exactly (widened by ``radius``, clipped to ``[0, size]``)."""
    lo = torch.div(need[:, 0], scale, rounding_mode="floor") - radius
    hi = -torch.div(-need[:, 1], scale, rounding_mode="floor") + radius
    return torch.stack([lo.clamp(0, size), hi.clamp(0, size)], 1)


def _place(ranges: Tensor, size: int) -> tuple[Tensor, int]:
    """Feature ranges ``[N, 2]`` -> starts ``[N]`` of windows of one common length holding each range."""
    length = int((ranges[:, 1] - ranges[:, 0]).max())
    return ranges[:, 0].clamp(max=size - length), length


def _exact(start: int, length: int, size: int, radius: int, scale: int) -> tuple[int, int]:
    """Output pixels of a window ``[start, start + length)`` that equal the full decoder's."""
    lo = 0 if start == 0 else (start + radius) * scale
    hi = size * scale if start + length == size else (start + length - radius) * scale
    return lo, hi


class WindowedMaskDecoder:
    """``decode(z)``: TAESD decoder layers on mask latents, full-resolution stages on windows.

    ``layers``: the decoder's ``nn.Sequential`` (input: ``tanh(z / 3) * 3``); ``stages``: how many of
    its trailing upsampling stages run on windows (1: the last, full-resolution one).
    """

    def __init__(self, layers: nn.Sequential, stages: int = 1):
        ups = [i for i, m in enumerate(layers) if isinstance(m, nn.Upsample)]
        self.layers = layers
        self.split = ups[-stages] if len(ups) >= stages >= 1 else None
        self.radius = None if self.split is None else receptive_radius(list(layers)[self.split:])
        self.usable = self.radius is not None
        self.windows = 0  # slices decoded on a window, since creation
        self.whole = 0  # slices decoded whole

    def decode(self, z: Tensor, background_latent: Tensor, background: Tensor) -> Tensor:
        """Mask latents ``z`` ``[N, C, h, w]``, the empty mask's latent ``[1, C, h, w]`` and the decoder's
        output on it ``[1, C_out, H, W]`` -> the decoder's output ``[N, C_out, H, W]`` (its own scale,
        [0, 1] for TAESD: the caller maps it to [-1, 1])."""
        assert self.split is not None and self.radius is not None
        feats = self.layers[:self.split](_channels_last(torch.tanh(z / 3) * 3))
        tail = self.layers[self.split:]
        n, _, fh, fw = feats.shape
        out_h = background.shape[-2]
        scale, px = out_h // fh, out_h // z.shape[-2]
        dist = (z.float() - background_latent.float()).norm(dim=1)  # [N, h, w]
        differs = dist > LATENT_DISTANCE
        empty = ~differs.flatten(1).any(1)
        if bool(empty.any()):  # keep the most different position: every slice gets a checked window
            differs.view(n, -1)[empty, dist.flatten(1).argmax(1)[empty]] = True
        if LATENT_DILATION:
            differs = F.max_pool2d(differs[:, None].float(), 2 * LATENT_DILATION + 1, 1, LATENT_DILATION)[:, 0] > 0
        ry = _ranges(_span(differs.any(2)) * px, fh, self.radius, scale)
        rx = _ranges(_span(differs.any(1)) * px, fw, self.radius, scale)
        area = (ry[:, 1] - ry[:, 0]) * (rx[:, 1] - rx[:, 0])
        small = [i for i in range(n) if float(area[i]) <= MAX_WINDOW_FRACTION * fh * fw]
        out = background.to(feats.dtype).expand(n, -1, -1, -1).clone()
        redo = [i for i in range(n) if i not in set(small)]
        if small:
            y0, wh = _place(ry[small], fh)
            x0, ww = _place(rx[small], fw)
            crops = torch.stack([feats[i, :, int(y):int(y) + wh, int(x):int(x) + ww]
                                 for i, y, x in zip(small, y0, x0)])
            dec = tail(_channels_last(crops))
            out = out.to(dec.dtype)
            redo += self._paste(out, dec, small, y0, x0, (wh, ww), (fh, fw), scale)
        if redo:
            out[redo] = tail(feats[redo]).to(out.dtype)
        self.whole += len(redo)
        self.windows += n - len(redo)
        return out

    def _paste(self, out: Tensor, dec: Tensor, rows: list[int], y0: Tensor, x0: Tensor, window: tuple[int, int],
               feats: tuple[int, int], scale: int) -> list[int]:
        """Copy each window's exact part into ``out``; -> the rows whose window edge is not background."""
        assert self.radius is not None
        out_h, out_w = out.shape[-2:]
        edge_level = (EDGE_LEVEL + 1) / 2  # the decoder's [0, 1] scale
        redo = []
        for j, i in enumerate(rows):
            ya, yb = _exact(int(y0[j]), window[0], feats[0], self.radius, scale)
            xa, xb = _exact(int(x0[j]), window[1], feats[1], self.radius, scale)
            oy, ox = int(y0[j]) * scale, int(x0[j]) * scale
            part = dec[j, :, ya - oy:yb - oy, xa - ox:xb - ox]
            out[i, :, ya:yb, xa:xb] = part
            mean = part.float().mean(0)
            ring = [edge for edge, inside in ((mean[0], ya > 0), (mean[-1], yb < out_h), (mean[:, 0], xa > 0),
                                              (mean[:, -1], xb < out_w)) if inside]
            if ring and float(torch.cat(ring).max()) > edge_level:
                redo.append(i)
        return redo


def _span(hit: Tensor) -> Tensor:
    """``[N, L]`` bool -> ``[N, 2]`` (first, last + 1) of the True entries (each row has one)."""
    idx = torch.arange(hit.shape[1], device=hit.device).expand_as(hit)
    first = torch.where(hit, idx, hit.shape[1]).amin(1)
    last = torch.where(hit, idx, -1).amax(1)
    return torch.stack([first, last + 1], 1)


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)
