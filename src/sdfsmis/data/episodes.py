"""Training episodes: self-supervised (supervoxel pseudo-labels, ADNet) and supervised (manual labels).

An episode is one query slice and K support slices of the same target (a supervoxel, or an organ)
with their binary masks. :class:`EpisodeSampler` loads every training volume of a prepared dataset
once, resized to ``image_size`` x ``image_size`` (bilinear for images, nearest for label maps) and
kept as torch tensors on ``device`` (images float16; supervoxel ids in supervoxel mode, manual
labels in supervised mode). ``sample(batch_size, generator)`` then draws the episodes' slice indices
on the CPU (NumPy, seeded from the generator) and does the gathering, mask binarisation and the
batched augmentation (:mod:`sdfsmis.data.augment`) on ``device``: one host-to-device copy of a few
integers per batch, no device-to-host synchronisation.

Rules (DESIGN §4-5):

- **Training scans**: the scans outside the fold (:func:`sdfsmis.data.folds.split`), or an explicit
  list (``train_scan_ids``: cross-domain training or "all scans").
- **Setting 2** drops every training slice that contains *any* of the excluded organs (default: the
  spec's evaluated organs; SSL-ALPNet's rule, not RPT's AND). No slice of an episode (query or
  support) is ever such a slice. Setting 1 keeps every slice. See :func:`usable_sv_rows` and
  :func:`usable_organ_rows`, which list exactly what may be drawn.
- **Minimum mask size**: a target is drawable on a slice only if its mask covers at least
  ``min_mask_px`` pixels *at the training resolution*, before augmentation. The check is done once
  for every candidate when the sampler is built (from per-slice area tables), which is equivalent to
  "draw, and draw again if a mask is under the limit" without any per-step device round trip.
- **Supervoxel mode, adjacent pairs** (ADNet, 3-D supervoxels): uniform training scan, uniform
  usable ``(z, sv)`` row of its ``sv_pairs``; slices ``z`` and ``z + 1`` are query and first support
  in random order; masks are ``supervoxels == sv``. K-shot: the further supports are the next
  slices outwards from the pair that still hold the supervoxel (``z - 1, z + 2, z - 2, z + 3, ...``,
  each side stopping at the first slice that is too small or excluded). When the supervoxel spans
  too few slices, the supports are repeated and every repeat is augmented on its own, so repeats
  differ. With ``query_gap = G > 1`` the first support is ``z`` or ``z + 1`` (at random) and the query
  is drawn uniformly among the slices 1..G away from it that still hold the supervoxel (usable:
  large enough, not excluded; the other slice of the pair always is), so query and support masks
  differ more than on adjacent slices; further supports skip the query's slice.
- **Supervoxel mode, same slice** (``pseudo_pairs="same_slice"``; for 2-D superpixels, where ids do
  not carry across slices, SSL-ALPNet's scheme): query and support are the same slice ``z``; the
  augmentation rule below makes them differ. ``"auto"`` (default) follows the dataset's
  ``pair_offset`` (1: 3-D supervoxels -> adjacent, 0: 2-D superpixels -> same slice).
- **Supervised mode** (manual labels; SDSeg and the supervised upper bound): uniform training scan,
  uniform organ among ``organs`` (default: every labelled organ of the spec) that the scan holds on
  enough usable slices, query and supports = distinct random slices of that organ, in the same scan
  (``pairing="same_scan"``, default) or the supports from another training scan holding the organ
  (``pairing="cross_scan"``, like the evaluation protocol). Setting 2 applies the same slice
  exclusion, so excluded organs drop out on their own.
- **Augmentation** (``augment_which``): ``"one"`` (ADNet: per episode, either the query or the
  supports, at random, get affine + elastic + gamma), ``"both"`` (the SD-FSMIS supplementary: query
  and supports), ``"none"``. Repeated support slices are always augmented unless ``"none"``.

Determinism: the episodes depend only on the generator's state (its state seeds the NumPy decisions
and the augmentation then continues from the same generator), so the same seed gives the same
batches; a CPU generator gives the same batches whatever the sampler's device. Drawing a batch never
waits for the GPU.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError
from .augment import AugmentConfig, augment
from .folds import split

MODES = ("supervoxel", "supervised")
AUGMENT_WHICH = ("one", "both", "none")
PSEUDO_PAIRS = ("auto", "adjacent", "same_slice")
PAIRINGS = ("same_scan", "cross_scan")


@dataclass(frozen=True)
class EpisodeConfig:
    mode: str = "supervoxel"  # "supervoxel" (pseudo-labels) | "supervised" (manual labels)
    fold: int = 0  # 0..4; training scans are the ones outside this fold
    setting: int = 1  # 1: every slice; 2: no slice holding an excluded organ
    shots: int = 1  # K support slices per episode
    min_mask_px: int = 200  # smallest mask (pixels at image_size) of query and supports
    image_size: int = 256  # slices are resized to image_size x image_size
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    augment_which: str = "one"  # "one" | "both" | "none"
    train_scan_ids: tuple[str, ...] | None = None  # overrides the fold (cross-domain, all scans)
    exclude_organs: tuple[str, ...] | None = None  # Setting 2 organs; default spec.eval_organs
    organs: tuple[str, ...] | None = None  # supervised targets; default every organ of spec.labels
    pseudo_pairs: str = "auto"  # supervoxel mode: "adjacent" (3-D) | "same_slice" (2-D) | "auto" (dataset's)
    pairing: str = "same_scan"  # supervised mode: "same_scan" | "cross_scan"
    query_gap: int = 1  # supervoxel mode, adjacent: the query is up to this many slices from the support
    seed: int = 0  # seeds the sampler's own generator (used when sample() gets none)

    def __post_init__(self) -> None:
        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.setting in (1, 2), f"setting must be 1 or 2, got {self.setting!r}"),
            (self.shots >= 1, f"shots must be >= 1, got {self.shots}"),
            (self.min_mask_px >= 1, f"min_mask_px must be >= 1, got {self.min_mask_px}"),
            (self.image_size >= 8, f"image_size must be >= 8, got {self.image_size}"),
            (self.augment_which in AUGMENT_WHICH, f"augment_which must be one of {AUGMENT_WHICH}"),
            (self.pseudo_pairs in PSEUDO_PAIRS, f"pseudo_pairs must be one of {PSEUDO_PAIRS}"),
            (self.pairing in PAIRINGS, f"pairing must be one of {PAIRINGS}"),
            (self.query_gap >= 1, f"query_gap must be >= 1, got {self.query_gap}"),
        ]
        for ok, problem in checks:
            if not ok:
                raise InputError(None, f"episode config: {problem}")


@dataclass(frozen=True)
class Episode:
    """Where one episode's slices come from (axial indices ``z`` of the scans' volumes)."""

    scan_id: str  # the query's scan
    target: int  # supervoxel id (supervoxel mode) or label id (supervised mode)
    query_z: int
    support_scan_id: str  # == scan_id except for supervised cross-scan episodes
    support_z: tuple[int, ...]  # K entries
    augmented: tuple[bool, ...]  # 1 + K flags: query first, then the supports


# ----------------------------------------------------------------------------------------------
# Pure helpers (listing what may be drawn)


def training_scan_ids(scan_ids: Sequence[str], fold: int, override: Sequence[str] | None = None) -> list[str]:
    """Training scans: ``override`` when given (each must exist), else the scans outside ``fold``."""
    if override is not None:
        missing = [s for s in override if s not in set(scan_ids)]
        if missing:
            raise InputError(None, f"training scans {missing} are not in the dataset ({list(scan_ids)})")
        return list(dict.fromkeys(override))
    train, _ = split(list(scan_ids), fold)
    return train


def slices_with_labels(label: np.ndarray, label_ids: Iterable[int]) -> np.ndarray:
    """bool ``[Z]``: the slices ``label[:, :, z]`` (volume ``[X, Y, Z]``) holding any of ``label_ids``."""
    ids = list(label_ids)
    if not ids:
        return np.zeros(label.shape[2], dtype=bool)
    return np.isin(label, ids).any(axis=(0, 1))


def area_table(volume: Tensor, n_ids: int) -> np.ndarray:
    """int64 ``[Z, n_ids + 1]``: pixel count of every id ``0..n_ids`` on every slice of ``[Z, H, W]``."""
    z = volume.shape[0]
    offsets = torch.arange(z, device=volume.device)[:, None] * (n_ids + 1)
    flat = volume.reshape(z, -1).long() + offsets
    return torch.bincount(flat.flatten(), minlength=z * (n_ids + 1)).view(z, n_ids + 1).cpu().numpy()


def usable_sv_rows(sv_pairs: np.ndarray, areas: np.ndarray, excluded: np.ndarray, min_px: int,
                   adjacent: bool = True) -> np.ndarray:
    """int64 ``[M, 2]`` rows ``(z, sv)`` that may start an episode.

    adjacent: rows of ``sv_pairs`` whose supervoxel covers ``>= min_px`` on slices ``z`` and
    ``z + 1`` (``areas`` from :func:`area_table`), neither slice excluded. Otherwise (same slice):
    every ``(z, sv)`` with ``sv >= 1``, ``>= min_px`` on ``z``, ``z`` not excluded.
    """
    n_z, width = areas.shape
    if not adjacent:
        zz, ss = np.nonzero(areas >= min_px)
        keep = (ss >= 1) & ~excluded[zz]
        return np.stack([zz[keep], ss[keep]], 1).astype(np.int64)
    pairs = np.asarray(sv_pairs, dtype=np.int64).reshape(-1, 2)
    z, sv = pairs[:, 0], pairs[:, 1]
    bad = (z < 0) | (z + 1 >= n_z) | (sv < 1) | (sv >= width)
    if bad.any():
        raise ValueError(f"sv_pairs rows {pairs[bad][:3].tolist()} are outside the volume or its supervoxel ids")
    ok = (areas[z, sv] >= min_px) & (areas[z + 1, sv] >= min_px) & ~excluded[z] & ~excluded[z + 1]
    return pairs[ok]


def usable_organ_rows(areas: np.ndarray, excluded: np.ndarray, label_ids: Iterable[int], min_px: int) -> np.ndarray:
    """int64 ``[M, 2]`` rows ``(z, label_id)``: organ ``label_id`` covers ``>= min_px`` on slice ``z``,
    ``z`` not excluded."""
    rows = []
    for lid in label_ids:
        if lid >= areas.shape[1]:
            continue
        zs = np.nonzero((areas[:, lid] >= min_px) & ~excluded)[0]
        rows.append(np.stack([zs, np.full_like(zs, lid)], 1))
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 2), np.int64)


def resize_slices(volume: np.ndarray, size: int, mode: str, device: torch.device) -> Tensor:
    """``[X, Y, Z]`` volume -> ``[Z, size, size]`` tensor on ``device``: ``bilinear`` (float16 out) or
    ``nearest`` (same dtype out; centre-aligned nearest neighbour)."""
    t = torch.as_tensor(np.ascontiguousarray(np.moveaxis(np.asarray(volume), 2, 0)), device=device)
    if mode == "bilinear":
        if tuple(t.shape[-2:]) != (size, size):
            t = F.interpolate(t[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        return t.to(torch.float16)
    if tuple(t.shape[-2:]) == (size, size):
        return t
    out = F.interpolate(t[:, None].float(), size=(size, size), mode="nearest-exact")[:, 0]
    return out.round().to(t.dtype)


def _state_seed(generator: torch.Generator) -> list[int]:
    """A NumPy seed from the generator's state, then advance the generator by one draw.

    ``get_state`` is a host-side read for CPU and CUDA generators alike, so a CUDA generator costs no
    device synchronisation here (``torch.randint(...).item()`` would wait for the queued GPU work)."""
    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=16).digest()
    torch.empty(1, device=generator.device).uniform_(generator=generator)  # the next call differs
    return np.frombuffer(digest, dtype=np.uint32).tolist()


# ----------------------------------------------------------------------------------------------


class EpisodeSampler:
    """Draws batches of training episodes from a prepared dataset; see the module docstring.

    ``dataset``: a :class:`sdfsmis.data.prepared.PreparedDataset`, its folder, or any object with
    ``.spec``, ``.scan_ids`` and ``.load(id)`` (arrays ``image``, ``label``, ``supervoxels``,
    ``sv_pairs`` in the prepared format).
    """

    def __init__(self, dataset: Any, config: EpisodeConfig = EpisodeConfig(), device: torch.device | str = "cpu",
                 progress: bool = True):
        if isinstance(dataset, (str, os.PathLike)):
            from .prepared import PreparedDataset  # imported here: the reader is optional for callers

            dataset = PreparedDataset(dataset)
        self.dataset = dataset
        self.config = config
        self.device = torch.device(device)
        self.root = getattr(dataset, "root", None)
        spec = dataset.spec
        self.train_ids = training_scan_ids(list(dataset.scan_ids), config.fold, config.train_scan_ids)
        excluded_organs = spec.eval_organs if config.exclude_organs is None else config.exclude_organs
        self.excluded_label_ids = self._label_ids(spec, excluded_organs) if config.setting == 2 else ()
        organs = tuple(spec.labels) if config.organs is None else config.organs
        self.target_label_ids = self._label_ids(spec, organs)
        self._generator = torch.Generator().manual_seed(config.seed)

        supervoxel = config.mode == "supervoxel"
        self.pseudo_pairs = self._pseudo_pairs(dataset)
        size = config.image_size
        images, targets = [], []
        self._offsets: dict[str, int] = {}
        self._excluded: dict[str, np.ndarray] = {}
        self._areas: dict[str, np.ndarray] = {}
        self._rows: dict[str, np.ndarray] = {}
        offset = 0
        for sid in tqdm(self.train_ids, desc="loading training scans", disable=not progress):
            scan = dataset.load(sid)
            label = np.asarray(scan.label)
            excluded = slices_with_labels(label, self.excluded_label_ids)
            target_np = np.asarray(scan.supervoxels) if supervoxel else label
            if supervoxel and target_np.max(initial=0) < 2**15:
                target_np = target_np.astype(np.int16)
            target = resize_slices(target_np, size, "nearest", self.device)
            n_ids = int(target_np.max(initial=0))
            areas = area_table(target, n_ids)
            if supervoxel:
                try:
                    rows = usable_sv_rows(np.asarray(scan.sv_pairs), areas, excluded, config.min_mask_px,
                                          adjacent=self.pseudo_pairs == "adjacent")
                except ValueError as err:
                    raise InputError(self._scan_path(sid), str(err)) from err
            else:
                rows = usable_organ_rows(areas, excluded, self.target_label_ids, config.min_mask_px)
            images.append(resize_slices(scan.image, size, "bilinear", self.device))
            targets.append(target)
            self._offsets[sid] = offset
            offset += target.shape[0]
            self._excluded[sid], self._areas[sid], self._rows[sid] = excluded, areas, rows
        if not images:
            raise InputError(self.root, "no training scans")
        self._images = torch.cat(images)  # [N, S, S] float16, every training slice
        common = torch.int32 if any(t.dtype == torch.int32 for t in targets) else targets[0].dtype
        self._targets = torch.cat([t.to(common) for t in targets])  # [N, S, S] supervoxel or label ids
        self._build_candidates()

    # -- set-up helpers ------------------------------------------------------------------------

    def _label_ids(self, spec: Any, organs: Iterable[str]) -> tuple[int, ...]:
        unknown = [o for o in organs if o not in spec.labels]
        if unknown:
            raise InputError(self.root, f"organs {unknown} are not labels of dataset {spec.name!r} "
                                        f"({sorted(spec.labels)})")
        return tuple(int(spec.labels[o]) for o in organs)

    def _pseudo_pairs(self, dataset: Any) -> str:
        """"adjacent" or "same_slice" from the config and the dataset's ``pair_offset`` (default 1)."""
        offset = int(getattr(dataset, "pair_offset", 1))
        wanted = self.config.pseudo_pairs
        if wanted == "auto":
            return "adjacent" if offset == 1 else "same_slice"
        if wanted == "adjacent" and offset != 1 and self.config.mode == "supervoxel":
            raise InputError(self.root, f"the dataset's pseudo-labels are 2-D (pair_offset {offset}): their ids "
                                        "do not carry across slices; use pseudo_pairs='same_slice' or 'auto'")
        return wanted

    def _scan_path(self, sid: str) -> Path | None:
        info = getattr(self.dataset, "info", None)
        if self.root is None or info is None:
            return self.root
        return Path(self.root) / info(sid).file

    def _build_candidates(self) -> None:
        cfg = self.config
        if cfg.mode == "supervoxel":
            self._scans = [s for s in self.train_ids if len(self._rows[s])]
        else:
            # organ slices per scan; an organ is a candidate when an episode can be built from it
            self._organ_z = {s: {int(lid): rows[rows[:, 1] == lid, 0] for lid in np.unique(rows[:, 1])}
                             for s, rows in ((s, self._rows[s]) for s in self.train_ids)}
            need = 2 if cfg.pairing == "same_scan" else 1
            self._organs: dict[str, list[int]] = {}
            for s in self.train_ids:
                organs = [lid for lid, zs in self._organ_z[s].items() if len(zs) >= need]
                if cfg.pairing == "cross_scan":
                    organs = [lid for lid in organs if any(lid in self._organ_z[o] for o in self.train_ids if o != s)]
                if organs:
                    self._organs[s] = organs
            self._scans = list(self._organs)
        if not self._scans:
            raise InputError(self.root, f"no usable training episodes ({cfg.mode} mode, setting {cfg.setting}, "
                             f"min_mask_px {cfg.min_mask_px}, {len(self.train_ids)} training scans)")

    # -- public inspection ---------------------------------------------------------------------

    def usable_rows(self, scan_id: str) -> np.ndarray:
        """``[M, 2]`` rows ``(z, target)`` this sampler may draw from a scan: ``(z, sv)`` episode
        starts in supervoxel mode (slices z and z+1 when adjacent), ``(z, label_id)`` in supervised."""
        return self._rows[scan_id]

    def drawable_masks(self, scan_id: str) -> np.ndarray:
        """int64 ``[M, 2]`` rows ``(z, target)``: every slice mask an episode of this sampler can draw
        from the scan (a superset in supervoxel mode: each usable target on every usable slice)."""
        rows = self._rows[scan_id]
        if self.config.mode != "supervoxel" or self.pseudo_pairs != "adjacent":
            return rows
        targets = np.unique(rows[:, 1])
        ok = (self._areas[scan_id][:, targets] >= self.config.min_mask_px) & ~self._excluded[scan_id][:, None]
        zz, tt = np.nonzero(ok)
        return np.stack([zz, targets[tt]], 1).astype(np.int64)

    def excluded_slices(self, scan_id: str) -> np.ndarray:
        """bool ``[Z]``: slices of a training scan that no episode uses (Setting 2)."""
        return self._excluded[scan_id]

    # -- drawing --------------------------------------------------------------------------------

    def _holds(self, sid: str, sv: int, z: int) -> bool:
        """Slice ``z`` of the scan exists, is not excluded and holds ``sv`` on >= ``min_mask_px``."""
        excluded = self._excluded[sid]
        return 0 <= z < len(excluded) and not excluded[z] and self._areas[sid][z, sv] >= self.config.min_mask_px

    def _extend(self, sid: str, sv: int, z: int, n: int) -> list[int]:
        """Up to ``n`` further slices holding supervoxel ``sv`` outwards from the pair (z, z+1)."""
        out: list[int] = []
        left, right, left_open, right_open = z - 1, z + 2, True, True
        while len(out) < n and (left_open or right_open):
            if left_open:
                if self._holds(sid, sv, left):
                    out.append(left)
                    left -= 1
                else:
                    left_open = False
            if len(out) < n and right_open:
                if self._holds(sid, sv, right):
                    out.append(right)
                    right += 1
                else:
                    right_open = False
        return out

    def _draw(self, rng: np.random.Generator) -> Episode:
        cfg, k = self.config, self.config.shots
        sid = self._scans[rng.integers(len(self._scans))]
        support_sid = sid
        if cfg.mode == "supervoxel":
            rows = self._rows[sid]
            z, target = (int(v) for v in rows[rng.integers(len(rows))])
            if self.pseudo_pairs == "adjacent" and cfg.query_gap > 1:
                support = z + int(rng.integers(2))
                near = [q for q in range(support - cfg.query_gap, support + cfg.query_gap + 1)
                        if q != support and self._holds(sid, target, q)]
                query_z = near[rng.integers(len(near))]
                supports = [support] + [s for s in self._extend(sid, target, z, k) if s != query_z][:k - 1]
            elif self.pseudo_pairs == "adjacent":
                pair = (z, z + 1)
                first = int(rng.integers(2))
                query_z, supports = pair[first], [pair[1 - first]]
                supports += self._extend(sid, target, z, k - 1)
            else:
                query_z, supports = z, [z]
        else:
            organs = self._organs[sid]
            target = organs[rng.integers(len(organs))]
            zs = self._organ_z[sid][target]
            query_z = int(zs[rng.integers(len(zs))])
            if cfg.pairing == "same_scan":
                pool = zs[zs != query_z]
            else:
                others = [o for o in self.train_ids if o != sid and target in self._organ_z[o]]
                support_sid = others[rng.integers(len(others))]
                pool = self._organ_z[support_sid][target]
            supports = [int(v) for v in rng.choice(pool, size=min(k, len(pool)), replace=False)]
        n_real = len(supports)
        while len(supports) < k:
            supports.append(supports[(len(supports) - n_real) % n_real])
        if cfg.augment_which == "none":
            flags = [False] * (k + 1)
        elif cfg.augment_which == "both":
            flags = [True] * (k + 1)
        else:
            query_side = bool(rng.random() < 0.5)
            flags = [query_side] + [not query_side] * n_real + [True] * (k - n_real)
        return Episode(scan_id=sid, target=int(target), query_z=int(query_z), support_scan_id=support_sid,
                       support_z=tuple(supports), augmented=tuple(flags))

    @property
    def generator(self) -> torch.Generator:
        """The sampler's own generator (seeded with ``config.seed``): what draws use without one."""
        return self._generator

    def draw(self, batch_size: int, generator: torch.Generator | None = None) -> list[Episode]:
        """The episodes of a batch (no tensors); advances ``generator`` by one draw."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        gen = self.generator if generator is None else generator
        rng = np.random.default_rng(_state_seed(gen))
        return [self._draw(rng) for _ in range(batch_size)]

    def episode_rows(self, episodes: Sequence[Episode]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slice index (into :attr:`slice_images`), target id and augmentation flag of every image
        of ``episodes``, int64/int64/bool ``[B(1+K)]``: the B queries, then each episode's K supports."""
        b, k = len(episodes), self.config.shots
        index = np.empty(b * (k + 1), np.int64)
        target = np.empty(b * (k + 1), np.int64)
        flags = np.empty(b * (k + 1), bool)
        for i, ep in enumerate(episodes):
            index[i] = self._offsets[ep.scan_id] + ep.query_z
            target[i], flags[i] = ep.target, ep.augmented[0]
            rows = slice(b + i * k, b + (i + 1) * k)
            index[rows] = self._offsets[ep.support_scan_id] + np.asarray(ep.support_z)
            target[rows], flags[rows] = ep.target, ep.augmented[1:]
        return index, target, flags

    @property
    def slice_images(self) -> Tensor:
        """float16 ``[N, S, S]``: every slice of the training scans, resized, in [-1, 1]."""
        return self._images

    def slice_range(self, scan_id: str) -> range:
        """Rows of :attr:`slice_images` (and ``masks`` indices) that hold the scan's slices, in z order."""
        start = self._offsets[scan_id]
        return range(start, start + len(self._excluded[scan_id]))

    def masks(self, index: np.ndarray, target: np.ndarray) -> Tensor:
        """float ``[M, 1, S, S]`` in {0, 1}: slice ``index[i]`` == id ``target[i]`` (supervoxel or label)."""
        index_t = torch.from_numpy(np.asarray(index, np.int64)).to(self.device, non_blocking=True)
        target_t = torch.from_numpy(np.asarray(target, np.int64)).to(self.device, non_blocking=True)
        return (self._targets[index_t] == target_t.to(self._targets.dtype)[:, None, None]).float()[:, None]

    def render(self, episodes: Sequence[Episode], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Tensors of ``episodes`` on the sampler's device (keys and shapes: :meth:`sample`)."""
        gen = self.generator if generator is None else generator
        b, k, s = len(episodes), self.config.shots, self.config.image_size
        index, target, flags = self.episode_rows(episodes)
        index_t = torch.from_numpy(index).to(self.device, non_blocking=True)
        images = self._images[index_t].float()[:, None]  # [B(1+K), 1, S, S]
        masks = self.masks(index, target)
        chosen = np.nonzero(flags)[0]
        if len(chosen):
            chosen_t = torch.from_numpy(chosen).to(self.device, non_blocking=True)
            aug_images, aug_masks = augment(images[chosen_t], masks[chosen_t], self.config.augment, gen)
            images[chosen_t], masks[chosen_t] = aug_images, aug_masks
        return {
            "query_images": images[:b],
            "query_masks": masks[:b],
            "support_images": images[b:].reshape(b, k, 1, s, s),
            "support_masks": masks[b:].reshape(b, k, 1, s, s),
        }

    def sample_with_info(self, batch_size: int, generator: torch.Generator | None = None
                         ) -> tuple[dict[str, Tensor], list[Episode]]:
        """:meth:`sample` plus the :class:`Episode` records the batch was built from."""
        episodes = self.draw(batch_size, generator)
        return self.render(episodes, generator), episodes

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A batch of episodes on the sampler's device, float32:

        ``query_images`` ``[B, 1, S, S]`` in [-1, 1], ``query_masks`` ``[B, 1, S, S]`` in {0, 1},
        ``support_images`` / ``support_masks`` ``[B, K, 1, S, S]``. ``generator`` (any device; default
        the sampler's own, seeded with ``config.seed``) fixes the batch completely.
        """
        return self.sample_with_info(batch_size, generator)[0]

    # -- resume ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """State of the sampler's own generator (what ``sample`` uses without a generator)."""
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"])


__all__ = [
    "EpisodeConfig", "Episode", "EpisodeSampler", "training_scan_ids", "slices_with_labels", "area_table",
    "usable_sv_rows", "usable_organ_rows", "resize_slices",
]
