"""`ckd prepare imagefolder|imagenet`: a `train/<class>/*.jpg|png`, `val/<class>/...` folder
into FFCV `.beton` files of JPEG-encoded images.

Layout written into `--out`:

    train.beton, test.beton   fields: image (RGBImageField, jpg mode: at most `max_side`
                              on the long side), label, index, orig_height, orig_width
    train_files.txt, test_files.txt   relative path and label of sample i on line i
    skipped.txt               corrupt/unreadable files (path, error), never a crash
    meta.json                 classes, counts, fingerprint, normalization, parameters

Class indices follow torchvision's ImageFolder (sorted class folder names, files sorted
within a class), so sample i is ImageFolder's sample i minus the skipped files; for
`imagenet` the 1000 classes are the sorted WordNet ids, the standard ImageNet-1k order.
Images are decoded like torchvision's loader (PIL, `.convert("RGB")`, no EXIF rotation),
shrunk with OpenCV's INTER_AREA when the long side exceeds `max_side` (FFCV's own rule),
then JPEG-encoded once (OpenCV, `quality`).

Resume: decoding is done in parts of `part_size` files (`.parts/<split>-<k>.npz`, each
written atomically), then the .beton is assembled from the parts (a copy, no re-decoding)
and the parts deleted. `--resume` after a kill keeps every finished part.

The fingerprint is sha256 over the class list and, per sample, label, original and stored
size and the sha256 of the stored JPEG bytes: `beton_fingerprint` recomputes it from the
.beton files alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ckd.atomic import atomic_open, atomic_path, atomic_write_text

from .beton import META, ffcv_workers, import_ffcv
from .datasets import histogram_stats

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_FOLDERS = {"train": ("train",), "test": ("val", "test")}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what torchvision's ImageNet checkpoints expect
IMAGENET_STD = (0.229, 0.224, 0.225)
_WNID = re.compile(r"n\d{8}")
PARTS = ".parts"
FIELDS = ("image", "label", "index", "orig_height", "orig_width")


@dataclass
class FolderScan:
    """Sorted classes and, per split, the (relative path, label) of every image file."""

    root: Path
    classes: list[str]
    files: dict[str, list[tuple[str, int]]]
    split_dirs: dict[str, str]


def scan_folder(data_dir: str | Path, *, imagenet: bool = False) -> FolderScan:
    """List the image files of an ImageFolder-style tree, with clear errors on bad trees."""
    root = Path(data_dir)
    layout = "train/<class>/*.jpg|png and val/<class>/*.jpg|png"
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {root}: no such folder (expected {layout})")
    split_dirs = {}
    for split, names in SPLIT_FOLDERS.items():
        found = [n for n in names if (root / n).is_dir()]
        if not found:
            raise FileNotFoundError(
                f"--data-dir {root}: no {' or '.join(f'{n}/' for n in names)} folder; "
                f"expected {layout}")
        split_dirs[split] = found[0]
    classes = sorted(e.name for e in os.scandir(root / split_dirs["train"]) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root / split_dirs['train']}: no class folders ({layout})")
    if imagenet:
        bad = [c for c in classes if not _WNID.fullmatch(c)]
        if len(classes) != 1000 or bad:
            raise ValueError(
                f"{root / split_dirs['train']}: ImageNet-1k needs 1000 class folders named by "
                f"WordNet id (n01440764 ...), found {len(classes)}"
                + (f", e.g. {bad[:3]} do not look like wnids" if bad else "")
                + "; use `ckd prepare imagefolder` for other folders")
    label_of = {c: i for i, c in enumerate(classes)}
    files: dict[str, list[tuple[str, int]]] = {}
    for split, sub in split_dirs.items():
        found_classes = sorted(e.name for e in os.scandir(root / sub) if e.is_dir())
        extra = sorted(set(found_classes) - set(classes))
        if extra:
            hint = (" (ImageNet's raw val/ is flat: sort it into class folders first)"
                    if imagenet else "")
            raise ValueError(f"{root / sub}: class folders {extra[:5]} are not in "
                             f"{split_dirs['train']}/{hint}")
        if not found_classes and imagenet:
            raise ValueError(f"{root / sub}: no class folders; ImageNet's raw val/ is flat: "
                             "sort it into <wnid>/ folders (the usual valprep script) first")
        rows = []
        for c in found_classes:
            rows += [(rel, label_of[c]) for rel in _class_files(root, root / sub / c)]
        if not rows:
            raise FileNotFoundError(f"{root / sub}: no image files ({', '.join(IMG_EXTENSIONS)})")
        have = {label for _, label in rows}
        empty = [c for c in classes if label_of[c] not in have]
        if split == "train" and empty:  # torchvision's ImageFolder refuses them too
            raise FileNotFoundError(
                f"{root / sub}: class folder(s) {', '.join(empty[:5])} hold no image files "
                f"({', '.join(IMG_EXTENSIONS)}): add their images, or remove the folders")
        files[split] = rows
    return FolderScan(root, classes, files, split_dirs)


def _class_files(root: Path, class_dir: Path) -> list[str]:
    """The image files under one class folder (relative to `root`), in torchvision's
    ImageFolder order (directories sorted by path, files by name). Directory links are
    followed, except a loop, a second link to a folder already walked, or a link into
    another part of the data tree (another class's images): those are refused by name."""
    tree, base = root.resolve(), class_dir.resolve()
    seen: set[Path] = set()
    found, bad = [], []
    stack = [str(class_dir)]
    while stack:
        d = stack.pop()
        real = Path(d).resolve()
        if real in seen or (d != str(class_dir) and real.is_relative_to(tree)
                            and not real.is_relative_to(base)):
            bad.append(f"{os.path.relpath(d, root)} -> {real}")
            continue
        seen.add(real)
        names = []
        with os.scandir(d) as entries:
            for e in entries:
                if e.is_dir():  # follows links, as ImageFolder does
                    stack.append(os.path.join(d, e.name))
                elif e.name.lower().endswith(IMG_EXTENSIONS):
                    names.append(e.name)
        found.append((d, sorted(names)))
    if bad:
        raise ValueError(f"{class_dir}: directory link(s) {'; '.join(bad[:3])} form a loop or "
                         "lead to a folder walked already or to another class's images: "
                         "remove those links (links to folders outside the data tree are "
                         "followed)")
    return [os.path.relpath(os.path.join(d, n), root) for d, names in sorted(found)
            for n in names]


def encode_image(data: bytes, max_side: int, quality: int) -> tuple[np.ndarray, tuple, tuple]:
    """Decode (PIL, RGB), shrink to `max_side`, JPEG-encode: (jpeg uint8, orig (h, w),
    stored RGB array). Raises on corrupt or truncated data."""
    import cv2  # noqa: PLC0415 - heavy imports, worker side
    from PIL import Image  # noqa: PLC0415 - optional heavy dependency (Pillow)

    with Image.open(io.BytesIO(data)) as im:
        rgb = np.asarray(im.convert("RGB"))  # convert() loads: truncation raises here
    oh, ow = rgb.shape[:2]
    if max(oh, ow) > 65535:  # crop boxes are stored as uint16 (as FFCV stores sizes)
        raise ValueError(f"{ow} x {oh} px: larger than 65535 px on a side")
    if max(oh, ow) > max_side:  # FFCV's resizer: scale by max_side / long side, truncate
        ratio = max_side / max(oh, ow)
        size = (max(1, int(ratio * ow)), max(1, int(ratio * oh)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    ok, enc = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise ValueError("OpenCV could not JPEG-encode the decoded image")
    return enc.reshape(-1), (oh, ow), rgb


def _encode_part(root: str, rows: list[tuple[str, int]], max_side: int,
                 quality: int) -> dict:
    """Worker: one part's images -> arrays (successes) + skipped (path, error) list."""
    jpegs, labels, orig, stored, digests, paths, skipped = [], [], [], [], [], [], []
    hist = np.zeros((3, 256), dtype=np.int64)
    for rel, label in rows:
        try:
            jpeg, (oh, ow), rgb = encode_image((Path(root) / rel).read_bytes(), max_side,
                                               quality)
        except Exception as err:  # noqa: BLE001 - any decoder error: list the file, go on
            skipped.append((rel, f"{type(err).__name__}: {err}"))
            continue
        jpegs.append(jpeg)
        labels.append(label)
        orig.append((oh, ow))
        stored.append(rgb.shape[:2])
        digests.append(np.frombuffer(hashlib.sha256(jpeg.tobytes()).digest(), np.uint8))
        paths.append(rel)
        for c in range(3):
            hist[c] += np.bincount(rgb[..., c].reshape(-1), minlength=256)
    offsets = np.cumsum([0] + [len(j) for j in jpegs]).astype(np.int64)
    return dict(
        jpeg=np.concatenate(jpegs) if jpegs else np.zeros(0, np.uint8), offsets=offsets,
        labels=np.asarray(labels, np.int64), orig=np.asarray(orig, np.int32).reshape(-1, 2),
        stored=np.asarray(stored, np.int32).reshape(-1, 2),
        digests=np.asarray(digests, np.uint8).reshape(-1, 32), hist=hist,
        paths=np.asarray(paths, dtype=str), skipped=json.dumps(skipped))


def _save_part(path: Path, arrays: dict) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def _load_part(path: Path, skip: tuple[str, ...] = ()) -> dict:
    with np.load(path) as z:  # npz members are read only when asked for
        return {k: z[k] for k in z.files if k not in skip}


class _PartRows:
    """Indexable beton rows over the finished parts of one split (one part loaded per
    process at a time: ffcv's writer reads contiguous chunks)."""

    def __init__(self, parts: list[Path], counts: list[int]) -> None:
        self.parts, self.starts = parts, np.cumsum([0] + counts)
        self._loaded: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> tuple:
        k = int(np.searchsorted(self.starts, i, side="right") - 1)
        if self._loaded is None or self._loaded[0] != k:
            self._loaded = (k, _load_part(self.parts[k]))
        p, j = self._loaded[1], i - int(self.starts[k])
        jpeg = p["jpeg"][p["offsets"][j]:p["offsets"][j + 1]]
        (sh, sw), (oh, ow) = p["stored"][j], p["orig"][j]
        return (jpeg, int(sh), int(sw)), int(p["labels"][j]), int(i), int(oh), int(ow)


class _EncodedJpeg:
    """`RGBImageField.encode` for images prepare already JPEG-encoded (FFCV would encode
    again). Set on an RGBImageField instance: ffcv picks a field's type id by its exact
    class, so a subclass would not be readable by plain ffcv."""

    def __call__(self, destination: np.ndarray, value: tuple, malloc) -> None:
        from ffcv.fields.rgb_image import IMAGE_MODES  # noqa: PLC0415 - optional heavy dependency (ffcv)

        jpeg, height, width = value
        destination["mode"] = IMAGE_MODES["jpg"]
        destination["height"], destination["width"] = height, width
        destination["data_ptr"], storage = malloc(jpeg.nbytes)
        storage[:] = jpeg


def _write_split_beton(rows: _PartRows, path: Path, quality: int) -> None:
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField  # noqa: PLC0415 - heavy import
    from ffcv.writer import DatasetWriter  # noqa: PLC0415 - optional heavy dependency (ffcv)

    image = RGBImageField(write_mode="jpg", jpeg_quality=quality)
    image.encode = _EncodedJpeg()
    fields = {"image": image, "label": IntField(), "index": IntField(),
              "orig_height": IntField(), "orig_width": IntField()}
    with atomic_path(path) as tmp:
        writer = DatasetWriter(str(tmp), fields, num_workers=ffcv_workers())
        writer.from_indexed_dataset(rows, chunksize=256)


def _fingerprint(classes: list[str], per_split: list[tuple]) -> str:
    """sha256 over classes and each split's (labels, orig sizes, stored sizes, digests)."""
    h = hashlib.sha256(json.dumps(classes).encode())
    for labels, orig, stored, digests in per_split:
        h.update(np.int64(len(labels)).tobytes())
        h.update(np.ascontiguousarray(labels, "<i8").tobytes())
        h.update(np.ascontiguousarray(orig, "<i4").tobytes())
        h.update(np.ascontiguousarray(stored, "<i4").tobytes())
        h.update(np.ascontiguousarray(digests, np.uint8).tobytes())
    return h.hexdigest()[:16]


def _chunks(rows: list, size: int) -> Iterator[list]:
    for s in range(0, len(rows), size):
        yield rows[s:s + size]


def _manifest(scan: FolderScan, imagenet: bool, max_side: int, quality: int,
              part_size: int) -> dict:
    listing = hashlib.sha256(json.dumps([scan.classes, scan.files]).encode()).hexdigest()
    return dict(data_dir=str(scan.root.resolve()), imagenet=imagenet, max_side=max_side,
                quality=quality, part_size=part_size, listing_sha256=listing[:16])


def prepare_imagefolder(data_dir: str | Path, out: str | Path, *, imagenet: bool = False,
                        max_side: int = 512, quality: int = 90, resume: bool = False,
                        workers: int | None = None, part_size: int = 512,
                        progress: bool = True) -> dict:
    """Write `out`/{train,test}.beton + meta.json from an image folder; returns the meta.
    See the module docstring for the layout and the resume rule."""
    if not 16 <= int(max_side) <= 65535:
        raise ValueError(f"--max-side must be in 16..65535, got {max_side}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"--quality must be in 1..100, got {quality}")
    out = Path(out)
    parts_dir = out / PARTS
    if (out / META).is_file() and not parts_dir.exists():
        if resume:
            return _finished(out, data_dir, imagenet, int(max_side), int(quality))
        raise FileExistsError(f"{out} is already a prepared dataset; choose another --out "
                              "(or --resume, which keeps it)")
    if parts_dir.exists() and not resume:
        raise FileExistsError(f"{out} holds an interrupted `ckd prepare` ({parts_dir}); add "
                              "--resume to continue it, or delete the folder to start over")
    scan = scan_folder(data_dir, imagenet=imagenet)
    manifest = _manifest(scan, imagenet, int(max_side), int(quality), int(part_size))
    parts_dir.mkdir(parents=True, exist_ok=True)
    man_path = parts_dir / "manifest.json"
    if man_path.is_file():
        old = json.loads(man_path.read_text())
        diff = sorted(k for k in manifest if old.get(k) != manifest[k])
        if diff:
            raise ValueError(
                f"--resume: {out} was started with other inputs ({', '.join(diff)} differ: "
                f"{ {k: old.get(k) for k in diff} } vs { {k: manifest[k] for k in diff} }); "
                "rerun with the original options, or delete the folder to start over")
    else:
        atomic_write_text(man_path, json.dumps(manifest, indent=2) + "\n")

    jobs = [(split, k, rows) for split in SPLIT_FOLDERS
            for k, rows in enumerate(_chunks(scan.files[split], part_size))]
    part_path = {(s, k): parts_dir / f"{s}-{k:06d}.npz" for s, k, _ in jobs}
    todo = [j for j in jobs if not part_path[j[:2]].is_file()]
    total = sum(len(r) for *_, r in jobs)
    done = total - sum(len(r) for *_, r in todo)
    workers = max(1, workers or os.cpu_count() or 1)
    with tqdm(total=total, initial=done, unit="img", desc="decode+encode", disable=not progress,
              dynamic_ncols=True, smoothing=0.1) as bar, \
            ProcessPoolExecutor(max_workers=workers) as pool:
        pending = {}
        queue = iter(todo)
        for job in queue:  # keep 2 parts per worker in flight
            pending[pool.submit(_encode_part, str(scan.root), job[2], max_side, quality)] = job
            if len(pending) < 2 * workers:
                continue
            _drain(pending, part_path, bar, one=True)
        _drain(pending, part_path, bar, one=False)
    return _assemble(out, scan, jobs, part_path, manifest, imagenet, progress)


def _check_every_class_read(out: Path, scan: FolderScan, labels: np.ndarray,
                            skipped: list) -> None:
    """A class none of whose training images decoded is refused by name (it would be a
    class with no samples); the skipped files are listed in skipped.txt first."""
    count = np.bincount(labels, minlength=len(scan.classes))
    empty = [scan.classes[i] for i in np.flatnonzero(count == 0)]
    if empty:
        atomic_write_text(out / "skipped.txt", "".join(f"{p}\t{e}\n" for p, e in skipped))
        raise ValueError(f"class(es) {', '.join(empty[:5])}: none of their training images "
                         f"could be read (see {out / 'skipped.txt'}): replace those files or "
                         f"remove the class folders, then delete {out} and prepare again")


def _finished(out: Path, data_dir: str | Path, imagenet: bool, max_side: int,
              quality: int) -> dict:
    """The meta of a finished `out` that --resume keeps, if it was made from the same
    folder with the same options; refused otherwise (nothing is rewritten)."""
    meta = json.loads((out / META).read_text())
    extra = meta.get("extra") or {}
    asked = {"--data-dir": str(Path(data_dir).resolve()), "--max-side": max_side,
             "--quality": quality,
             "dataset": "imagenet" if imagenet else "imagefolder"}
    had = {"--data-dir": extra.get("source"), "--max-side": extra.get("max_side"),
           "--quality": extra.get("quality"), "dataset": meta.get("name")}
    diff = [f"{k} {had[k]} (now {asked[k]})" for k in asked if had[k] != asked[k]]
    if diff:
        raise FileExistsError(f"{out} is already prepared from other inputs: {', '.join(diff)}; "
                              "--resume keeps a finished folder only for the same inputs: "
                              "choose another --out, or delete it to prepare it again")
    return meta


def _drain(pending: dict, part_path: dict, bar, *, one: bool) -> None:
    while pending:
        finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for fut in finished:
            split, k, rows = pending.pop(fut)
            _save_part(part_path[(split, k)], fut.result())
            bar.update(len(rows))
        if one:
            return


def _assemble(out: Path, scan: FolderScan, jobs: list, part_path: dict, manifest: dict,
              imagenet: bool, progress: bool) -> dict:
    """Betons, file lists, skipped list, statistics, fingerprint, then meta.json (last:
    it marks the folder complete), then the parts are deleted."""
    counts, skipped, hist, per_split = {}, [], np.zeros((3, 256), np.int64), []
    for split in SPLIT_FOLDERS:
        paths = [part_path[(s, k)] for s, k, _ in jobs if s == split]
        arrays = [_load_part(p, skip=("jpeg",)) for p in paths]  # JPEG bytes stay on disk
        sizes = [len(a["labels"]) for a in arrays]
        counts[split] = sum(sizes)
        if counts[split] == 0:
            raise ValueError(f"{scan.root / scan.split_dirs[split]}: every image failed to "
                             "decode (see the skipped files); nothing to write")
        for a in arrays:
            skipped += [(p, e) for p, e in json.loads(str(a["skipped"]))]
        if split == "train":
            hist += sum(a["hist"] for a in arrays)
        cat = {k: np.concatenate([a[k] for a in arrays])
               for k in ("labels", "orig", "stored", "digests", "paths")}
        per_split.append((cat["labels"], cat["orig"], cat["stored"], cat["digests"]))
        if split == "train":
            _check_every_class_read(out, scan, cat["labels"], skipped)
        with atomic_open(out / f"{split}_files.txt", "w") as f:
            f.writelines(f"{p}\t{lab}\n"
                         for p, lab in zip(cat["paths"], cat["labels"], strict=True))
        if progress:
            print(f"[prepare] writing {out / f'{split}.beton'} ({counts[split]} images)")
        _write_split_beton(_PartRows(paths, sizes), out / f"{split}.beton", manifest["quality"])
    atomic_write_text(out / "skipped.txt", "".join(f"{p}\t{e}\n" for p, e in skipped))
    if imagenet:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = histogram_stats(hist)
    meta = dict(name="imagenet" if imagenet else "imagefolder", kind="images",
                num_classes=len(scan.classes), classes=scan.classes,
                fingerprint=_fingerprint(scan.classes, per_split), n_train=counts["train"],
                n_test=counts["test"], mean=list(mean), std=list(std), image_shape=None,
                fields=list(FIELDS), num_skipped=len(skipped),
                extra=dict(max_side=manifest["max_side"], quality=manifest["quality"],
                           source=manifest["data_dir"], test_folder=scan.split_dirs["test"]))
    atomic_write_text(out / META, json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out / PARTS)
    return meta

