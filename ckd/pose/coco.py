"""`ckd prepare coco-keypoints`: a COCO keypoint folder, unchanged, into FFCV betons of
top-down person crops.

Input (COCO's own layout): `DIR/annotations/person_keypoints_<split>.json` and the images
in `DIR/<split>/` (or `DIR/images/<split>/`); the split whose name holds "train" is the
training split, the one holding "val" (else "test") the test split.

Kept persons: `iscrowd == 0`, at least one labelled joint, a box of positive size (what
top-down pose training and evaluation use). Each is stored as a crop around its box:
the box is widened to the input aspect ratio, padded x`PADDING` (the field's 1.25), then
x`CONTEXT` more so that rotated and zoomed-out views still see image content; that region
is warped (OpenCV bilinear, zeros outside the image) to `store = round(input * CONTEXT)`
pixels.

    train.beton, test.beton  image uint8 [Hs, Ws, 3]; keypoints float32 [K, 3] (x, y in
                             stored-crop pixels, visibility 0/1/2 as in COCO; 0 0 0 when
                             not labelled); box float32 [4] (COCO xywh, original pixels);
                             crop float32 [3] (cx, cy, s): original = (p - c_store) / s +
                             (cx, cy), c_store = ((Ws-1)/2, (Hs-1)/2); area float32; image_id,
                             ann_id, index
    meta.json                joints, flip pairs, OKS sigmas, skeleton, input and store
                             sizes, mean/std, counts, fingerprint

Pixel coordinates are pixel centres (pixel (0, 0) covers [-0.5, 0.5]^2).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ckd.atomic import atomic_path, atomic_write_text
from ckd.data.beton import (
    META,
    BetonRows,
    ffcv_epoch,
    ffcv_workers,
    import_ffcv,
    keep_torch_threads,
)
from ckd.data.datasets import histogram_stats

PADDING = 1.25
CONTEXT = 1.5
SPLITS = ("train", "test")
# COCO's per-joint OKS sigmas (cocoapi), by joint name; other names get DEFAULT_SIGMA
COCO_SIGMAS = {"nose": .026, "left_eye": .025, "right_eye": .025, "left_ear": .035,
               "right_ear": .035, "left_shoulder": .079, "right_shoulder": .079,
               "left_elbow": .072, "right_elbow": .072, "left_wrist": .062,
               "right_wrist": .062, "left_hip": .107, "right_hip": .107, "left_knee": .087,
               "right_knee": .087, "left_ankle": .089, "right_ankle": .089}
DEFAULT_SIGMA = 0.05
FIELDS = ("image", "keypoints", "box", "crop", "area", "image_id", "ann_id", "index")


@dataclass
class PoseSplit:
    """One split's crops, all in memory (numpy)."""

    images: np.ndarray  # uint8 [N, Hs, Ws, 3]
    keypoints: np.ndarray  # float32 [N, K, 3]
    boxes: np.ndarray  # float32 [N, 4]
    crops: np.ndarray  # float32 [N, 3]
    areas: np.ndarray  # float32 [N]
    image_ids: np.ndarray  # int64 [N]
    ann_ids: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class PoseDataset:
    name: str
    train: PoseSplit
    test: PoseSplit
    meta: dict = field(default_factory=dict)

    @property
    def num_joints(self) -> int:
        return int(self.meta["num_joints"])

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.meta["input_size"])  # (H, W)


def flip_pairs(names: list[str]) -> list[tuple[int, int]]:
    """Joint index pairs swapped by a horizontal flip: `left_X` with `right_X`."""
    index = {n: i for i, n in enumerate(names)}
    return [(i, index["right_" + n[5:]]) for i, n in enumerate(names)
            if n.startswith("left_") and "right_" + n[5:] in index]


def flip_permutation(names: list[str]) -> list[int]:
    perm = list(range(len(names)))
    for a, b in flip_pairs(names):
        perm[a], perm[b] = b, a
    return perm


def parse_input_size(text: str) -> tuple[int, int]:
    """"64x48" -> (64, 48) (height x width)."""
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"--input-size {text!r}: write HEIGHTxWIDTH, e.g. 256x192") from None
    if h < 8 or w < 8:
        raise ValueError(f"--input-size {text!r}: both sides must be at least 8 pixels")
    return h, w


def store_size(input_size: tuple[int, int]) -> tuple[int, int]:
    return tuple(int(round(v * CONTEXT)) for v in input_size)


# ------------------------------------------------------------------------- finding splits
def find_splits(data_dir: str | Path) -> dict[str, tuple[Path, Path]]:
    """{"train"|"test": (json, image folder)} of a COCO keypoint folder."""
    root = Path(data_dir)
    files = sorted((root / "annotations").glob("person_keypoints_*.json"))
    if not files:
        raise FileNotFoundError(
            f"{root}: no annotations/person_keypoints_*.json; pass the COCO folder that holds "
            "annotations/ and the image folders (or run `ckd prepare coco-keypoints "
            "--synthetic` for the bundled synthetic set)")
    found: dict[str, tuple[Path, Path]] = {}
    for f in files:
        split = f.stem[len("person_keypoints_"):]
        kind = "train" if "train" in split else "test" if ("val" in split or "test" in split) \
            else None
        if kind is None or kind in found:
            continue
        for images in (root / split, root / "images" / split):
            if images.is_dir():
                found[kind] = (f, images)
                break
        else:
            raise FileNotFoundError(f"{f}: its images folder {root / split} is missing; put "
                                    f"the {split} images there (COCO layout)")
    for kind in SPLITS:
        if kind not in found:
            raise FileNotFoundError(f"{root}: no {'training' if kind == 'train' else 'val'} "
                                    f"split (annotations/person_keypoints_"
                                    f"{'train' if kind == 'train' else 'val'}*.json)")
    return found


def load_keypoint_json(path: Path) -> tuple[dict, list[dict], list[str], list]:
    """(images by id, kept person annotations, joint names, skeleton), checked."""
    doc = json.loads(Path(path).read_text())
    cats = [c for c in doc.get("categories", []) if c.get("keypoints")]
    anns = doc.get("annotations", [])
    if not cats or not any("keypoints" in a for a in anns):
        raise ValueError(f"{path}: no keypoint annotations (categories without 'keypoints' "
                         "or annotations without 'keypoints'); pass COCO's "
                         "person_keypoints_*.json, not instances_*.json")
    cat = cats[0]
    names = [str(n) for n in cat["keypoints"]]
    k = len(names)
    kept = []
    for a in anns:
        if a.get("category_id") != cat["id"] or a.get("iscrowd", 0) or "keypoints" not in a:
            continue
        kps = a["keypoints"]
        if len(kps) != 3 * k:
            raise ValueError(f"{path}: annotation {a.get('id')} has {len(kps) // 3} joints, "
                             f"the category lists {k}; fix the file")
        x, y, w, h = (float(v) for v in a["bbox"])
        if w <= 1 or h <= 1 or not any(v > 0 for v in kps[2::3]):
            continue
        kept.append(a)
    images = {int(im["id"]): im for im in doc.get("images", [])}
    return images, kept, names, cat.get("skeleton", [])


# ------------------------------------------------------------------------- crops
def crop_region(box: np.ndarray, store: tuple[int, int]) -> tuple[float, float, float]:
    """(cx, cy, s) of the stored crop of a COCO box: s = stored pixels per original pixel."""
    x, y, w, h = (float(v) for v in box)
    hs, ws = store
    aspect = ws / hs
    if w > h * aspect:
        h = w / aspect
    else:
        w = h * aspect
    return x + box[2] / 2.0 - 0.5, y + box[3] / 2.0 - 0.5, ws / (w * PADDING * CONTEXT)


def crop_matrix(crop: tuple[float, float, float], store: tuple[int, int]) -> np.ndarray:
    """2x3 affine: original pixel -> stored-crop pixel."""
    cx, cy, s = crop
    hs, ws = store
    return np.array([[s, 0.0, (ws - 1) / 2.0 - s * cx], [0.0, s, (hs - 1) / 2.0 - s * cy]])


def _crop_one(img: np.ndarray, ann: dict, store: tuple[int, int], k: int):
    import cv2  # noqa: PLC0415 - optional heavy dependency (OpenCV)

    box = np.asarray(ann["bbox"], dtype=np.float64)
    crop = crop_region(box, store)
    mat = crop_matrix(crop, store)
    pix = cv2.warpAffine(img, mat, (store[1], store[0]), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    kps = np.asarray(ann["keypoints"], dtype=np.float64).reshape(k, 3)
    out = np.zeros((k, 3), dtype=np.float32)
    lab = kps[:, 2] > 0
    out[lab, :2] = kps[lab, :2] @ mat[:, :2].T + mat[:, 2]
    out[:, 2] = kps[:, 2]
    area = float(ann.get("area", box[2] * box[3]))
    return pix, out, box.astype(np.float32), np.asarray(crop, np.float32), area


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415 - optional heavy dependency (Pillow)

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def check_split(json_path: Path, image_dir: Path) -> tuple:
    """Parse one split's JSON and check every image it needs exists (before any work)."""
    images, anns, names, skeleton = load_keypoint_json(json_path)
    need = sorted({int(a["image_id"]) for a in anns})
    missing = [i for i in need if i not in images
               or not (image_dir / images[i]["file_name"]).is_file()]
    if missing:
        first = images[missing[0]]["file_name"] if missing[0] in images else \
            f"image id {missing[0]} (not in the JSON's images list)"
        raise FileNotFoundError(f"{len(missing)} of {len(need)} images with keypoints are "
                                f"missing under {image_dir} (first: {first}); put COCO's "
                                f"{image_dir.name} images there")
    return images, anns, names, skeleton, need


def build_split(json_path: Path, image_dir: Path, checked: tuple, store: tuple[int, int],
                progress: bool = True) -> tuple[PoseSplit, list[str], list]:
    images, anns, names, skeleton, need = checked
    by_image: dict[int, list[dict]] = {}
    for a in anns:
        by_image.setdefault(int(a["image_id"]), []).append(a)
    k = len(names)
    rows = []
    for i in tqdm(need, desc=f"crop {json_path.stem}", disable=not progress, leave=False):
        img = _read_rgb(image_dir / images[i]["file_name"])
        for a in sorted(by_image[i], key=lambda a: int(a["id"])):
            rows.append((*_crop_one(img, a, store, k), i, int(a["id"])))
    if not rows:
        raise ValueError(f"{json_path}: no person with labelled keypoints and a box; "
                         "nothing to train on")
    cols = list(zip(*rows, strict=True))
    split = PoseSplit(np.stack(cols[0]), np.stack(cols[1]), np.stack(cols[2]),
                      np.stack(cols[3]), np.asarray(cols[4], np.float32),
                      np.asarray(cols[5], np.int64), np.asarray(cols[6], np.int64))
    return split, names, skeleton


# ------------------------------------------------------------------------- betons
def write_pose_beton(split: PoseSplit, path: Path) -> None:
    import_ffcv()
    from ffcv.fields import FloatField, IntField, NDArrayField  # noqa: PLC0415 - optional heavy dependency (ffcv)
    from ffcv.writer import DatasetWriter  # noqa: PLC0415 - optional heavy dependency (ffcv)

    def arr(a: np.ndarray) -> NDArrayField:
        return NDArrayField(dtype=a.dtype, shape=tuple(a.shape[1:]))

    fields = {"image": arr(split.images), "keypoints": arr(split.keypoints),
              "box": arr(split.boxes), "crop": arr(split.crops), "area": FloatField(),
              "image_id": IntField(), "ann_id": IntField(), "index": IntField()}
    with atomic_path(path) as tmp, keep_torch_threads():
        writer = DatasetWriter(str(tmp), fields, num_workers=ffcv_workers())
        writer.from_indexed_dataset(BetonRows(len(split), lambda i: (
            split.images[i], split.keypoints[i], split.boxes[i], split.crops[i],
            float(split.areas[i]), int(split.image_ids[i]), int(split.ann_ids[i]), int(i))),
            chunksize=500)


def read_pose_beton(path: Path) -> PoseSplit:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such .beton; create it with `ckd prepare "
                                "coco-keypoints`")
    with keep_torch_threads():
        import_ffcv()
        from ffcv.loader import Loader, OrderOption  # noqa: PLC0415 - optional heavy dependency (ffcv)

        loader = Loader(str(path), batch_size=512, num_workers=ffcv_workers(),
                        order=OrderOption.SEQUENTIAL, drop_last=False, os_cache=True)
        parts: list[list[np.ndarray]] = [[] for _ in FIELDS]
        for batch in ffcv_epoch(loader):
            for j, col in enumerate(batch):
                parts[j].append(np.asarray(col).copy())  # out of ffcv's reused buffers
    cols = [np.concatenate(p) for p in parts]
    order = np.argsort(cols[-1].reshape(-1), kind="stable")
    c = [x[order] for x in cols]
    return PoseSplit(c[0], c[1].astype(np.float32), c[2].astype(np.float32),
                     c[3].astype(np.float32), c[4].reshape(-1).astype(np.float32),
                     c[5].reshape(-1).astype(np.int64), c[6].reshape(-1).astype(np.int64))


def fingerprint(train: PoseSplit, test: PoseSplit, names: list[str]) -> str:
    h = hashlib.sha256(json.dumps(names).encode())
    for s in (train, test):
        for a in (s.images, s.keypoints, s.boxes, s.crops, s.areas, s.image_ids, s.ann_ids):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def prepare_coco_keypoints(data_dir: str | Path, out: str | Path, *,
                           input_size: tuple[int, int] = (64, 48), name: str | None = None,
                           progress: bool = True) -> dict:
    """Write train/test betons + meta.json of the person crops of a COCO keypoint folder."""
    splits = find_splits(data_dir)
    store = store_size(input_size)
    checked = {kind: check_split(*splits[kind]) for kind in SPLITS}
    built = {kind: build_split(*splits[kind], checked[kind], store, progress)
             for kind in SPLITS}
    (train, names, skeleton), (test, test_names, _) = built["train"], built["test"]
    if names != test_names:
        raise ValueError(f"{data_dir}: train and val JSONs list different joints "
                         f"({len(names)} vs {len(test_names)}); use one keypoint definition")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_pose_beton(train, out / "train.beton")
    write_pose_beton(test, out / "test.beton")
    hist = np.stack([np.bincount(train.images[..., c].reshape(-1), minlength=256)
                     for c in range(3)])
    mean, std = histogram_stats(hist)
    meta = {"name": name or Path(data_dir).resolve().name, "task": "pose",
            "num_joints": len(names), "joints": names, "flip_pairs": flip_pairs(names),
            "sigmas": [COCO_SIGMAS.get(n, DEFAULT_SIGMA) for n in names],
            "skeleton": skeleton, "input_size": list(input_size), "store_size": list(store),
            "padding": PADDING, "context": CONTEXT, "n_train": len(train), "n_test": len(test),
            "mean": list(mean), "std": list(std),
            "fingerprint": fingerprint(train, test, names)}
    atomic_write_text(out / META, json.dumps(meta, indent=2) + "\n")
    return meta


_LOADED: dict[tuple, PoseDataset] = {}


def load_pose_prepared(prepared: str | Path) -> PoseDataset:
    """Read a `ckd prepare coco-keypoints` folder back, checking its fingerprint (kept in
    memory per process while its files are unchanged: runs only read the arrays)."""
    d = Path(prepared).resolve()
    try:
        key = (str(d), *((f.stat().st_mtime_ns, f.stat().st_size) for f in
                         (d / META, d / "train.beton", d / "test.beton")))
    except OSError:
        key = None
    if key in _LOADED:
        return _LOADED[key]
    ds = _load_pose_prepared(d)
    if key is not None:
        _LOADED.clear()
        _LOADED[key] = ds
    return ds


def _load_pose_prepared(d: Path) -> PoseDataset:
    if not (d / META).is_file():
        raise FileNotFoundError(f"{d / META} missing: run `ckd prepare coco-keypoints "
                                f"--out {d}` first")
    meta = json.loads((d / META).read_text())
    if meta.get("task") != "pose":
        raise ValueError(f"{d} holds a classification dataset, not pose crops; prepare one "
                         "with `ckd prepare coco-keypoints`")
    train, test = (read_pose_beton(d / f"{s}.beton") for s in SPLITS)
    if fingerprint(train, test, meta["joints"]) != meta["fingerprint"]:
        raise ValueError(f"{d}: .beton contents do not match meta.json's fingerprint; re-run "
                         "`ckd prepare coco-keypoints`")
    return PoseDataset(meta["name"], train, test, meta)
