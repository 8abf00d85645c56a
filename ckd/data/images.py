"""Reading image .betons written by `ckd prepare imagefolder`: per-sample metadata without
decoding, the fingerprint recomputed from the stored bytes, and a loader whose FFCV decoder
replays given crop boxes exactly (one output per resolution).

FFCV's own RandomResizedCrop decoder draws its boxes from numba's unseeded global RNG, so
it cannot replay a cached view. `ReplayCropDecoder` instead reads the box of sample i from
a table row i (y0, x0, y1, x1, flip in stored pixels) that the host fills before each pass
(`ImageLoader.set_boxes`), then decodes the JPEG, crops, resizes with OpenCV's INTER_AREA
(FFCV's resize) to the target resolution and flips. The compiled decoder reads the table
through its address (numba would otherwise freeze a captured array as a constant), so
refilling the same buffer changes the boxes without recompiling.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from .beton import ffcv_epoch, ffcv_workers, import_ffcv, keep_torch_threads
from .imagefolder import SPLIT_FOLDERS, _fingerprint
from .loaders import _permutation_order_cls
from .rrc import stored_box

BOX_COLUMNS = ("y0", "x0", "y1", "x1", "flip")


class ImageBeton:
    """Labels, original and stored sizes of an image .beton, read from its metadata table
    (no image is decoded)."""

    def __init__(self, path: str | Path) -> None:
        import_ffcv()
        from ffcv.reader import Reader  # noqa: PLC0415 - heavy import

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such .beton; create it with "
                                    "`ckd prepare imagefolder --data-dir DIR --out ...`")
        self.reader = Reader(str(self.path))
        names = list(self.reader.handlers)
        need = ("image", "label", "index", "orig_height", "orig_width")
        if any(n not in names for n in need):
            raise ValueError(f"{self.path} has fields {names}, not an image beton "
                             f"({', '.join(need)}); re-run `ckd prepare imagefolder`")
        md = self.reader.metadata
        col = {n: md[f"f{names.index(n)}"] for n in need}
        self.n = int(self.reader.num_samples)
        self.labels = np.array(col["label"], dtype=np.int64)  # a copy: writable
        self.orig_hw = np.stack([col["orig_height"], col["orig_width"]], 1).astype(np.int64)
        self.stored_hw = np.stack([col["image"]["height"], col["image"]["width"]],
                                  1).astype(np.int64)
        if not np.array_equal(np.asarray(col["index"]), np.arange(self.n)):
            raise ValueError(f"{self.path}: index field is not 0..{self.n - 1}; "
                             "re-run `ckd prepare imagefolder`")
        self._image_ptr = np.asarray(col["image"]["data_ptr"], dtype=np.uint64)

    def __len__(self) -> int:
        return self.n

    def jpeg_bytes(self, i: int) -> bytes:
        """The stored JPEG of sample i (exactly as written)."""
        table = self.reader.alloc_table
        ptrs = table["ptr"]
        row = np.nonzero(ptrs == self._image_ptr[i])[0]
        size = int(table["size"][row[0]])
        with open(self.path, "rb") as f:
            f.seek(int(self._image_ptr[i]))
            return f.read(size)

    def digests(self) -> np.ndarray:
        """sha256 of every stored JPEG, uint8 [N, 32] (reads the whole file once)."""
        table = self.reader.alloc_table
        size_of = dict(zip(table["ptr"].tolist(), table["size"].tolist(), strict=True))
        out = np.empty((self.n, 32), np.uint8)
        with open(self.path, "rb") as f:
            for i, ptr in enumerate(self._image_ptr.tolist()):
                f.seek(ptr)
                out[i] = np.frombuffer(hashlib.sha256(f.read(size_of[ptr])).digest(), np.uint8)
        return out

    def stored_boxes(self, boxes: torch.Tensor, indices: torch.Tensor) -> np.ndarray:
        """Views (top, left, h, w, flip) in original pixels of samples `indices` -> table
        rows int32 [B, 5] in stored pixels."""
        idx = torch.as_tensor(indices, dtype=torch.int64).numpy()
        rows = stored_box(boxes, torch.from_numpy(self.orig_hw[idx]),
                          torch.from_numpy(self.stored_hw[idx]))
        return rows.numpy().astype(np.int32)


def beton_fingerprint(prepared_dir: str | Path) -> str:
    """The prepared folder's fingerprint recomputed from its .beton files alone."""

    d = Path(prepared_dir)
    meta = json.loads((d / "meta.json").read_text())
    per_split = []
    for split in SPLIT_FOLDERS:
        b = ImageBeton(d / f"{split}.beton")
        per_split.append((b.labels, b.orig_hw.astype(np.int32), b.stored_hw.astype(np.int32),
                          b.digests()))
    return _fingerprint(meta["classes"], per_split)


# ------------------------------------------------------------------ replaying decoder
def _address_intrinsic():
    from numba import types  # noqa: PLC0415 - optional heavy dependency (numba (ffcv's))
    from numba.core import cgutils  # noqa: PLC0415 - optional heavy dependency (numba (ffcv's))
    from numba.extending import intrinsic  # noqa: PLC0415 - optional heavy dependency (numba (ffcv's))

    @intrinsic
    def address_as_void_pointer(typingctx, src):  # noqa: ARG001 - numba's signature
        def codegen(cgctx, builder, sig, args):  # noqa: ARG001
            return builder.inttoptr(args[0], cgutils.voidptr_t)
        return types.voidptr(src), codegen

    return address_as_void_pointer


def _decoder_cls():
    import_ffcv()
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder  # noqa: PLC0415 - optional heavy dependency (ffcv)
    from ffcv.libffcv import imdecode, resize_crop  # noqa: PLC0415 - optional heavy dependency (ffcv)
    from ffcv.pipeline.compiler import Compiler  # noqa: PLC0415 - optional heavy dependency (ffcv)
    from numba import carray  # noqa: PLC0415 - optional heavy dependency (numba (ffcv's))

    as_pointer = _address_intrinsic()

    class ReplayCropDecoder(ResizedCropRGBImageDecoder):
        """Decode, crop table[i] (stored pixels), INTER_AREA-resize to `size`, flip."""

        def __init__(self, table: np.ndarray, size: int) -> None:
            super().__init__((int(size), int(size)))
            if table.dtype != np.int32 or table.ndim != 2 or table.shape[1] != 5 \
                    or not table.flags.c_contiguous:
                raise ValueError("the box table must be C-contiguous int32 [N, 5]")
            self.table = table  # owned here: the compiled code reads it by address

        @property
        def get_crop_generator(self):  # unused: boxes come from the table
            return None

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            address, rows = int(self.table.ctypes.data), int(self.table.shape[0])

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                table = carray(as_pointer(address), (rows, 5), np.int32)
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width,
                                   0, 0, 1, 1, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[:3 * height * width]
                        temp_buffer = temp_buffer.reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    y0, x0 = table[source_ix, 0], table[source_ix, 1]
                    y1, x1 = table[source_ix, 2], table[source_ix, 3]
                    out = destination[dst_ix]
                    resize_crop_c(temp_buffer, y0, y1, x0, x1, out)
                    if table[source_ix, 4]:
                        w = out.shape[1]
                        for r in range(out.shape[0]):
                            for c in range(w // 2):
                                for ch in range(3):
                                    tmp = out[r, c, ch]
                                    out[r, c, ch] = out[r, w - 1 - c, ch]
                                    out[r, w - 1 - c, ch] = tmp
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return ReplayCropDecoder


class ImageLoader:
    """Batches (images per resolution, labels, indices) of an image .beton, visiting
    exactly the indices given to `iterate`, each sample cropped by its row of the box table
    (`set_boxes`) and resized to every resolution in `sizes` (one decode per resolution).

    `center_crop=True` (evaluation) ignores the table: FFCV's deterministic center crop
    (ratio 224/256 of the short side, the standard ImageNet evaluation)."""

    def __init__(self, path: str | Path, sizes: Sequence[int], *, batch_size: int = 256,
                 center_crop: bool = False) -> None:
        import_ffcv()
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder  # noqa: PLC0415 - optional heavy dependency (ffcv)
        from ffcv.loader import Loader  # noqa: PLC0415 - optional heavy dependency (ffcv)
        from ffcv.pipeline import PipelineSpec  # noqa: PLC0415 - optional heavy dependency (ffcv)


        self.beton = ImageBeton(path)
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"resolutions must be positive ints, got {list(sizes)}")
        self.table = np.zeros((self.beton.n, 5), np.int32)
        self.table[:, 2:4] = self.beton.stored_hw  # default box: the whole stored image
        cls = _decoder_cls()
        pipelines: dict = {"image": None, "orig_height": None, "orig_width": None}
        for s in dict.fromkeys(self.sizes):
            dec = (CenterCropRGBImageDecoder((s, s), ratio=224 / 256) if center_crop
                   else cls(self.table, s))
            pipelines[f"image_{s}"] = PipelineSpec("image", decoder=dec, transforms=[])
        self._order = np.arange(self.beton.n, dtype=np.uint64)
        self.epoch, self.seed, self.batch_size = 0, 0, int(batch_size)
        with keep_torch_threads():  # an ffcv Loader sets torch's threads to its workers
            self._ffcv = Loader(str(path), batch_size=self.batch_size,
                                num_workers=ffcv_workers(), os_cache=True,
                                order=_permutation_order_cls()(self), drop_last=False,
                                pipelines=pipelines)
        names = list(self._ffcv.pipeline_specs)
        self._out = {k: names.index(k) for k in ("label", "index")}
        self._out.update({s: names.index(f"image_{s}") for s in dict.fromkeys(self.sizes)})

    def order(self, epoch: int | None = None) -> torch.Tensor:  # PermutationOrder's hook
        return torch.from_numpy(self._order.astype(np.int64))

    def set_boxes(self, indices: torch.Tensor, boxes: torch.Tensor) -> None:
        """Rows `indices` of the table <- views (top, left, h, w, flip) in original pixels."""
        idx = torch.as_tensor(indices, dtype=torch.int64).numpy()
        self.table[idx] = self.beton.stored_boxes(boxes, torch.from_numpy(idx))

    def iterate(self, indices: torch.Tensor | np.ndarray,
                ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        """Yield (uint8 [B, s, s, 3] per size in `sizes`, labels [B], indices [B]) visiting
        `indices` in order. Tensors are copies (FFCV reuses its buffers)."""
        self._order = np.asarray(indices, dtype=np.uint64).reshape(-1)
        if self._order.size == 0:
            return
        with closing(ffcv_epoch(self._ffcv)) as batches:
            for out in batches:
                imgs = [torch.from_numpy(np.array(out[self._out[s]])) for s in self.sizes]
                yield (imgs, torch.from_numpy(np.array(out[self._out["label"]])).reshape(-1),
                       torch.from_numpy(np.array(out[self._out["index"]])).reshape(-1))
