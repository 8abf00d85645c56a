"""`ckd cache info` and `ckd cache verify`: what a cache holds, and whether it is intact."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore

from .layout import check_compatible, layout_from_attrs, read_root_attrs
from .reader import list_mentors


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def info(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(root attributes, one row per mentor: alias, arch, test_acc, train_acc, views,
    complete, done_chunks, total_chunks, bytes (on disk), raw_bytes, ratio)."""
    path = Path(path)
    attrs = read_root_attrs(str(path))
    lay = layout_from_attrs(attrs)
    itemsize = 2 if lay.dtype == "float16" else 4
    raw = lay.num_slots * lay.num_samples * lay.num_classes * itemsize
    rows = []
    root = zarr.open_group(LocalStore(path), mode="r")
    for alias, m in list_mentors(path).items():
        marker = root[f"mentors/{alias}/train_correct"][:]
        done = sum(int((marker[lay.slot_range(a).start:lay.slot_range(a).stop, b] >= 0).all())
                   for a, b in lay.units())
        disk = dir_size(path / "mentors" / alias / "logits")
        rows.append(dict(alias=alias, arch=m.get("arch"), test_acc=m.get("test_acc"),
                         train_acc=m.get("train_acc"), views=lay.num_slots,
                         mode=attrs["views"]["mode"], complete=bool(m.get("complete")),
                         done_chunks=done, total_chunks=len(lay.units()), bytes=disk,
                         raw_bytes=raw, ratio=raw / max(1, disk)))
    return attrs, rows


@dataclass
class VerifyReport:
    chunks_read: int = 0
    rows_recomputed: int = 0
    max_abs_diff: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | Path, *, recompute: int = 0, dataset: Any = None, device: str = "cpu",
           seed: int = 0, progress: bool = False) -> VerifyReport:
    """Completeness (markers, `complete` attr), checksums and finite values of every chunk
    (each chunk is read: the crc32c codec checks it), and with `recompute` > 0 that many
    random (slot, sample) rows per mentor recomputed from its checkpoint."""
    from tqdm import tqdm

    path = Path(path)
    rep = VerifyReport()
    attrs = read_root_attrs(str(path))
    lay = layout_from_attrs(attrs)
    root = zarr.open_group(LocalStore(path), mode="r")
    mentors = list_mentors(path)
    if not mentors:
        rep.problems.append("no mentors in the cache")
    labels = root["labels"][:]
    if labels.shape != (lay.num_samples,) or labels.min() < 0 or \
            labels.max() >= lay.num_classes:
        rep.problems.append("labels array is missing entries or out of range")
    units = lay.units()
    with tqdm(total=len(units) * len(mentors), desc="verify chunks", unit="chunk",
              disable=not progress) as bar:
        for alias, m in mentors.items():
            if not m.get("complete"):
                rep.problems.append(f"{alias}: incomplete (rerun the cache-logits command)")
            arr, marker = root[f"mentors/{alias}/logits"], root[f"mentors/{alias}/train_correct"][:]
            for a, b in units:
                sr, sm = lay.slot_range(a), lay.sample_range(b)
                key = f"{alias}/logits/c/{a}/{b}/0"
                if (marker[sr.start:sr.stop, b] < 0).any():
                    rep.problems.append(f"{key}: not computed (no completion marker)")
                    bar.update(1)
                    continue
                try:
                    vals = arr[sr.start:sr.stop, sm.start:sm.stop, :]
                except Exception as err:  # noqa: BLE001 - crc32c / codec failure
                    rep.problems.append(f"{key}: unreadable ({err})")
                    bar.update(1)
                    continue
                rep.chunks_read += 1
                if not np.isfinite(vals).all():
                    rep.problems.append(f"{key}: {int((~np.isfinite(vals)).sum())} "
                                        "non-finite values")
                bar.update(1)
    if recompute > 0 and mentors:
        _recompute(path, attrs, lay, root, mentors, recompute, dataset, device, seed, rep)
    return rep


def load_cache_dataset(attrs: dict[str, Any], data_dir: str | None = None,
                       prepared: str | None = None) -> Any:
    """The dataset a cache was built from (synthetic rebuilt from its stored params)."""
    from ckd.data import load_dataset

    ds_attrs = attrs["dataset"]
    if prepared:
        from ckd.data import load_prepared

        return load_prepared(prepared)
    return load_dataset(ds_attrs["name"], data_dir, download=False,
                        **(ds_attrs.get("params") or {}))


def _recompute(path: Path, attrs: dict[str, Any], lay: Any, root: zarr.Group,
               mentors: dict[str, dict[str, Any]], n_rows: int, dataset: Any, device: str,
               seed: int, rep: VerifyReport) -> None:
    from ckd.data.views import RECIPE, apply_views
    from ckd.models import file_sha256

    from .mentors import load_mentor

    if dataset is None:
        dataset = load_cache_dataset(attrs)
    check_compatible(attrs, fingerprint=dataset.fingerprint, num_classes=dataset.num_classes,
                     recipe=RECIPE, path=str(path))
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
        with torch.no_grad():
            ref = model(apply_views(images, torch.from_numpy(vids).to(dev), mean, std)).cpu()
        arr = root[f"mentors/{alias}/logits"]
        cls = np.arange(lay.num_classes)[None]
        got = torch.from_numpy(np.asarray(arr.vindex[slots[:, None], idx[:, None], cls]))
        ref = ref.to(got.dtype).float()
        got = got.float()
        diff = (got - ref).abs()
        # Other batch compositions may change fp32 results in the last bits; fp16 rows
        # may then round to the neighbouring fp16 value.
        tol = 1e-4 + (2.0 ** -10 if lay.dtype == "float16" else 1e-5) * ref.abs()
        rep.rows_recomputed += n_rows
        rep.max_abs_diff = max(rep.max_abs_diff, float(diff.max()))
        bad = int((diff > tol).any(dim=1).sum())
        if bad:
            rep.problems.append(f"{alias}: {bad}/{n_rows} recomputed rows differ "
                                f"(max |diff| {float(diff.max()):.3g})")
