"""`ckd cache verify --recompute N`: N random cached rows recomputed from the mentors'
checkpoints (the views re-derived from the seed: view ids, or an image folder's crop boxes)
and compared with the stored ones."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ckd.data import load_dataset
from ckd.data.image_views import ImageViews, open_prepared
from ckd.data.protocol import TrainingData
from ckd.data.views import apply_views, normalize
from ckd.kernels.sparse_mentors import parse_mode
from ckd.mentor_stats import mentor_row_stats
from ckd.models import file_sha256
from ckd.models.forward import mentor_features, mentor_forward

from .layout import Layout, check_compatible
from .mentors import load_mentor, recorded_precision


@dataclass
class VerifyReport:
    chunks_read: int = 0
    rows_recomputed: int = 0
    max_abs_diff: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def load_cache_dataset(attrs: dict[str, Any], data_dir: str | None = None,
                       prepared: str | None = None) -> TrainingData:
    """The dataset a cache was built from (synthetic rebuilt from its stored params)."""
    ds_attrs = attrs["dataset"]
    if prepared:
        return open_prepared(prepared)
    return load_dataset(ds_attrs["name"], data_dir, download=False,
                        **(ds_attrs.get("params") or {}))


def recompute_rows(path: Path, attrs: dict[str, Any], lay: Layout, root: zarr.Group,
                   mentors: dict[str, dict[str, Any]], n_rows: int,
                   dataset: TrainingData | None, device: str, seed: int,
                   rep: VerifyReport) -> None:
    """Recompute `n_rows` random rows of every mentor into `rep` (the discrete views
    from the stored view ids or the seed; continuous crops from their re-derived boxes)."""
    if dataset is None:
        dataset = load_cache_dataset(attrs)
    if dataset.recipe.num_views is None:  # continuous crops: boxes re-derived, re-decoded
        _recompute_crops(path, attrs, lay, root, mentors, n_rows, dataset, device, seed, rep)
        return
    check_compatible(attrs, fingerprint=dataset.fingerprint, num_classes=dataset.num_classes,
                     recipe=dataset.recipe.record, path=str(path))
    gen = np.random.default_rng(seed)
    slots = gen.integers(0, lay.num_slots, n_rows)
    idx = gen.integers(0, lay.num_samples, n_rows)
    if attrs["views"]["mode"] == "keyed":
        vids = root["view_ids"][:][slots, idx].astype(np.int64)
    else:
        vids = slots
    dev = torch.device(device)
    images = torch.from_numpy(dataset.train.images[idx]).to(dev)
    mean, std = attrs["normalization"]["mean"], attrs["normalization"]["std"]
    for alias, m in mentors.items():
        ckpt = Path(m["checkpoint"])
        if not ckpt.is_file():
            rep.problems.append(f"{alias}: checkpoint {ckpt} not found, cannot recompute")
            continue
        if file_sha256(ckpt) != m["checkpoint_sha256"]:
            rep.problems.append(f"{alias}: {ckpt} changed since caching (sha256 differs)")
            continue
        model = load_mentor(alias, ckpt, lay.num_classes, dev)
        features = tuple(m.get("features") or {})
        x = apply_views(images, torch.from_numpy(vids).to(dev), mean, std)
        precision = recorded_precision(m)  # the forward the build ran, at its precision
        if features:  # with features, the one `is_feat` forward
            stages, logits = mentor_forward(model, x, precision, features=True)
            recomputed = {"logits": logits, **mentor_features(stages, features)}
        else:
            recomputed = {"logits": mentor_forward(model, x, precision)}
        mode = m.get("logits_mode", "dense")
        if mode != "dense":  # a sparse mentor: its stored entries and statistics
            labels = torch.from_numpy(dataset.train.labels[idx])
            dense = recomputed.pop("logits").cpu()
            recomputed.update(sparse_reference(mode, lay.num_classes, dense, labels, root,
                                               alias, slots, idx, lay.dtype))
        for name, ref in recomputed.items():
            try:
                got = torch.from_numpy(stored_rows(root[f"mentors/{alias}/{name}"], slots, idx))
            except Exception as err:  # noqa: BLE001 - named like every other read failure
                rep.problems.append(f"{alias}/{name}: cannot read the recomputed rows ({err})")
                continue
            compare_rows(rep, path, alias, name, ref.cpu(), got, lay.dtype, precision)


def sparse_reference(mode_spec: str, num_classes: int, logits: torch.Tensor,
                     labels: torch.Tensor, root: zarr.Group, alias: str, slots: np.ndarray,
                     idx: np.ndarray, dtype: str) -> dict[str, torch.Tensor]:
    """What a sparse mentor's arrays must hold for recomputed dense `logits` [n, C]: the
    logits at its stored class ids, the row statistics, and (topk) the statistics of the
    classes it left out. Draws (sample) and near-tie orders (topk) are not re-derived: the
    stored ids are taken and their values checked."""
    mode, _ = parse_mode(mode_spec, num_classes)
    z = logits.to(getattr(torch, dtype)).float()  # the logits as a dense cache stores them
    ids = torch.from_numpy(stored_rows(root[f"mentors/{alias}/{mode}_ids"], slots,
                                       idx).astype(np.int64)).clamp(0, num_classes - 1)
    vals = z.gather(-1, ids)
    if mode == "sample":  # an empty slot (a class drawn no more) stores 0
        counts = stored_rows(root[f"mentors/{alias}/sample_counts"], slots, idx)
        vals = torch.where(torch.from_numpy(counts.astype(np.int64)) > 0, vals, 0.0)
    out = {f"{mode}_logits": vals, "stats": mentor_row_stats(z, labels)}
    if mode == "topk":
        rest = z.scatter(-1, ids, float("-inf"))
        k = ids.shape[-1]
        if k < num_classes:
            mean = (z.double().sum(-1) - z.gather(-1, ids).double().sum(-1)) / (num_classes - k)
            out["topk_rest"] = torch.stack([torch.logsumexp(rest, -1), mean.float()], -1)
    return out


def stored_rows(arr: zarr.Array, slots: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows (slots[i], idx[i]) of a [S, N, *shape] array: [n, *shape]."""
    suffix = arr.shape[2:]
    k = len(suffix)
    lead = (slots.reshape(-1, *[1] * k), idx.reshape(-1, *[1] * k))
    rest = tuple(np.arange(d).reshape([1] * (1 + j) + [d] + [1] * (k - 1 - j))
                 for j, d in enumerate(suffix))
    return np.asarray(arr.vindex[lead + rest])


def compare_rows(rep: VerifyReport, path: Path, alias: str, name: str, ref: torch.Tensor,
                 got: torch.Tensor, dtype: str, precision: str = "fp32") -> None:
    """Rows recomputed from a checkpoint (`ref`, fp32) against the stored ones (`got`,
    [n, ...] of mentors/alias/name): a problem naming the mentor, the array, how many rows
    differ and the rebuild command."""
    ref, got = ref.to(got.dtype).float(), got.float()
    diff = (got - ref).abs()
    # Other batch compositions may change fp32 results in the last bits; fp16 rows may
    # then round to the neighbouring fp16 value.
    # bf16/fp16 autocast rounds inside the forward: a few units of its last place.
    rel = {"bf16": 2.0 ** -6, "fp16": 2.0 ** -8}.get(precision,
                                                   2.0 ** -10 if dtype == "float16" else 1e-5)
    tol = 1e-4 + rel * ref.abs()
    n_rows = len(ref)
    rep.rows_recomputed += n_rows if name.endswith("logits") else 0
    rep.max_abs_diff = max(rep.max_abs_diff, float(diff.max()))
    bad = int((diff > tol).reshape(n_rows, -1).any(dim=1).sum())
    if bad:
        rep.problems.append(f"{alias}/{name}: {bad}/{n_rows} recomputed rows differ from the "
                            f"stored ones (max |diff| {float(diff.max()):.3g}): rebuild the "
                            f"mentor with `ckd cache-logits --out {path} --mentors "
                            f"{alias}=CHECKPOINT ... --overwrite`")


def _recompute_crops(path: Path, attrs: dict[str, Any], lay: Layout, root: zarr.Group,
                     mentors: Mapping[str, dict[str, Any]], n_rows: int, views: ImageViews,
                     device: str, seed: int, rep: VerifyReport) -> None:
    """`ckd cache verify --recompute N` on an image cache: re-derive the boxes of N random
    (slot, image) rows from `rrc_views` and recompute their logits from the checkpoints."""
    check_compatible(attrs, fingerprint=views.fingerprint, num_classes=views.num_classes,
                     recipe=views.recipe.record, path=str(path))
    gen = np.random.default_rng(seed)
    slots = gen.integers(0, lay.num_slots, n_rows)
    idx = gen.integers(0, lay.num_samples, n_rows)
    cache_seed = int(attrs["views"]["seed"])
    expected = np.empty((n_rows, 5), np.int64)
    for k in np.unique(slots):
        rows = np.nonzero(slots == k)[0]
        expected[rows] = views.boxes(cache_seed, int(k), torch.from_numpy(idx[rows])).numpy()
    dev = torch.device(device)
    for alias, m in mentors.items():
        stored = np.asarray(root[f"mentors/{alias}/boxes"].vindex[
            slots[:, None], idx[:, None], np.arange(5)[None]]).astype(np.int64)
        bad = int((stored != expected).any(axis=1).sum())
        if bad:
            rep.problems.append(f"{alias}: {bad}/{n_rows} stored boxes differ from the views "
                                "re-derived from the seed")
        ckpt = Path(m["checkpoint"])
        if not ckpt.is_file() or file_sha256(ckpt) != m["checkpoint_sha256"]:
            rep.problems.append(f"{alias}: checkpoint {ckpt} missing or changed since caching")
            continue
        model = load_mentor(alias, ckpt, lay.num_classes, dev)
        loader = views.loader("train", int(m["resolution"]))
        ref = torch.empty((n_rows, lay.num_classes))
        with torch.no_grad():
            for k in np.unique(slots):
                rows = np.nonzero(slots == k)[0]
                loader.set_boxes(torch.from_numpy(idx[rows]), torch.from_numpy(expected[rows]))
                for (imgs,), _, batch_idx in loader.iterate(np.unique(idx[rows])):
                    x = normalize(imgs.to(dev), views.mean, views.std).permute(0, 3, 1, 2)
                    out = mentor_forward(model, x, recorded_precision(m)).float().cpu()
                    for j, i in enumerate(batch_idx.tolist()):
                        ref[rows[idx[rows] == i]] = out[j]
        raw = torch.from_numpy(stored_rows(root[f"mentors/{alias}/logits"], slots, idx))
        compare_rows(rep, path, alias, "logits", ref, raw, lay.dtype, recorded_precision(m))
