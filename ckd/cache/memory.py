"""`MemoryRows`: a row source that decompresses the chosen mentors once.

Dense mentors go into one tensor [M, S*N, padded C] (pinned CPU memory, or GPU memory when
`device` is CUDA and it fits; rows padded to 16 bytes, `ckd.row_align`) and a step's rows
are one `index_select` on that device. A cache with a sparse mentor keeps each mentor's
step arrays ([S*N, ...] each); features, one [S*N, *shape] tensor per mentor. Every unit
read is checked against its crc32c.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ckd.row_align import padded_width

from .reader import CacheReader
from .rows import RowBatch, dense_rows, feature_rows, mentor_rows

READ_BYTES = 64 << 20  # raw bytes per zarr read call (zarr decodes its chunks in parallel)


class MemoryRows(CacheReader):
    """Every row of the chosen mentors in memory, loaded when opened."""

    mode = "memory"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 mentors: Sequence[str] | None = None, features: Sequence[str] = (),
                 progress: bool = False) -> None:
        super().__init__(path, device, mentors, features)
        self._progress = progress
        self._buf: torch.Tensor | None = None  # dense mentors: [M, S*N, padded C]
        self._stats: torch.Tensor | None = None  # dense mentors: [M, S*N, K]
        self._arrays: dict[str, dict[str, torch.Tensor]] = {}  # else: per mentor and array
        if self.sparse:
            self._arrays = self._load_arrays()
        else:
            self._buf, self._stats = self._load_dense()
        self._feat = self._load_features()

    def _rows(self, slots: torch.Tensor, indices: torch.Tensor, chosen: list[str],
              with_stats: bool, features: tuple[str, ...]) -> RowBatch:
        if self._buf is not None:
            dev = self._buf.device
            flat = slots.to(dev) * self.num_samples + indices.to(dev)
            sel = None if chosen == self.mentors else \
                torch.tensor([self.mentors.index(m) for m in chosen])
            batch = dense_rows(_pick(self._buf, flat, sel),
                               _pick(self._stats, flat, sel) if with_stats else None,
                               self.num_classes, self.device)
        else:
            flat = slots * self.num_samples + indices
            arrays = [{k: v.index_select(0, flat) for k, v in self._arrays[a].items()}
                      for a in chosen]
            batch = mentor_rows(arrays, [self.logits_modes[a] for a in chosen],
                                self.num_classes, self.device, with_stats)
        rows = slots * self.num_samples + indices
        tables = {name: self._feat[name] for name in features}
        return batch._replace(features=feature_rows(tables, rows, self.device))

    def _load_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        m, s, n, c = len(self.mentors), self.num_slots, self.num_samples, self.num_classes
        k = len(self.stat_fields)
        cp = padded_width(c, self.dtype)  # rows padded to 16 bytes (ckd.row_align)
        nbytes = m * s * n * (cp * (2 if self.dtype == torch.float16 else 4) + 4 * k)
        on_gpu = self.device.type == "cuda" and \
            torch.cuda.mem_get_info(self.device)[0] > nbytes * 1.2 + (1 << 30)
        pin = self.device.type == "cuda" and not on_gpu
        dev = self.device if on_gpu else "cpu"
        # Filled block by block in place (straight into GPU memory when it fits).
        buf = torch.empty((m, s * n, cp), dtype=self.dtype, pin_memory=pin, device=dev)
        buf[..., c:] = 0  # the pad: deterministic bytes (the kernels mask it)
        stats = torch.empty((m, s * n, k), dtype=torch.float32, pin_memory=pin, device=dev)
        view, sview = buf.view(m, s, n, cp)[..., :c], stats.view(m, s, n, k)
        lay = self.layout
        step = max(lay.samples_per_chunk,
                   READ_BYTES // max(1, s * c * buf.element_size())
                   // lay.samples_per_chunk * lay.samples_per_chunk)

        with tqdm(total=m * n, desc="load logit cache", unit="sample", unit_scale=True,
                  disable=not self._progress) as bar:
            for j, alias in enumerate(self.mentors):
                for n0 in range(0, n, step):
                    n1 = min(n, n0 + step)
                    vals = self.read_checked(alias, "logits", slice(None), slice(n0, n1))
                    view[j, :, n0:n1] = torch.from_numpy(vals)
                    st = self.read_checked(alias, "stats", slice(None), slice(n0, n1))
                    sview[j, :, n0:n1] = torch.from_numpy(st)
                    bar.update(n1 - n0)
        return buf, stats

    def _load_arrays(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every array a step reads of every mentor (`step_arrays`: its logits, dense or
        sparse, and its stats), [S*N, ...] per array (slot-major rows, as the dense buffer)."""
        s, n = self.num_slots, self.num_samples
        bufs: dict[str, dict[str, torch.Tensor]] = {}
        for alias in self.mentors:
            bufs[alias] = {}
            for name in self.step_arrays(alias):
                vals = np.ascontiguousarray(
                    self.read_checked(alias, name, slice(None), slice(None)))
                bufs[alias][name] = torch.from_numpy(vals).reshape(s * n, *vals.shape[2:])
        return bufs

    def _load_features(self) -> dict[str, list[torch.Tensor]]:
        """Every requested feature array, one [S * N, *shape] tensor per mentor (store
        dtype, on the device when it fits)."""
        out: dict[str, list[torch.Tensor]] = {}
        for name in self.features:
            out[name] = []
            for alias in self.mentors:
                vals = self.read_checked(alias, name, slice(None), slice(None))
                t = torch.from_numpy(vals).reshape(-1, *vals.shape[2:])
                out[name].append(t.to(self.device) if self.device.type == "cuda" else t)
        return out


def _pick(buf: torch.Tensor, rows: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
    """buf[sel][:, rows] as index_selects (sel None: every mentor)."""
    return buf.index_select(1, rows) if sel is None else \
        buf.index_select(0, sel.to(buf.device)).index_select(1, rows)


__all__ = ["MemoryRows", "READ_BYTES"]
