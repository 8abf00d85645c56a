"""A small synthetic keypoint set in COCO format: stick figures drawn with PIL.

`make_synthetic_coco(out, seed)` writes, exactly as COCO lays it out,

    out/annotations/person_keypoints_train.json   out/train/000000000001.png ...
    out/annotations/person_keypoints_val.json     out/val/...

Each image holds one or two figures with 13 COCO-named joints (nose, shoulders, elbows,
wrists, hips, knees, ankles) at a random pose, scale and body rotation, over a noisy
background with distractor strokes; some figures are partly covered by an occluder (their
covered joints get visibility 1, "labelled, not visible") or cut by the image border (those
joints get 0 0 0, as in COCO). Figures face the camera, so a figure's left joints lie on the
image's right, the convention a horizontal flip with a left/right swap preserves. The same
seed writes the same files (PNG, lossless).

A figure's `area` (COCO: its segmentation area, the OKS scale) is half its box: a stick
figure's drawn pixels cover far less of its box than a person's silhouette does, and would
make OKS several times stricter than on COCO.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ckd.atomic import atomic_write_text

JOINTS = ("nose", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
          "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee",
          "left_ankle", "right_ankle")
SKELETON = ((1, 2), (1, 3), (3, 5), (2, 4), (4, 6), (1, 7), (2, 8), (7, 8), (7, 9),
            (9, 11), (8, 10), (10, 12), (0, 1), (0, 2))  # 0-based joint pairs (limbs)
IMAGE_SIZE = 128


def _figure(rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """Joint positions [13, 2] (image pixels, may leave the image) and the torso length."""
    torso = rng.uniform(0.14, 0.3) * size
    hip_c = rng.uniform([0.2 * size, 0.35 * size], [0.8 * size, 0.8 * size])
    lean = math.radians(rng.normal(0.0, 12.0))
    up = np.array([math.sin(lean), -math.cos(lean)])  # hip -> neck direction
    right = np.array([-up[1], up[0]])  # image-right when upright (the figure's left)
    neck = hip_c + torso * up
    j = np.zeros((13, 2))
    j[0] = neck + 0.38 * torso * up
    j[1], j[2] = neck + 0.28 * torso * right, neck - 0.28 * torso * right
    j[7], j[8] = hip_c + 0.18 * torso * right, hip_c - 0.18 * torso * right

    def limb(start: np.ndarray, base_deg: float, length: float) -> np.ndarray:
        ang = math.radians(base_deg) + lean
        return start + length * np.array([math.sin(ang), math.cos(ang)])

    for side, sign in ((0, 1.0), (1, -1.0)):  # 0: left (image right), 1: right
        sh, hp = j[1 + side], j[7 + side]
        a1 = sign * rng.uniform(10, 150)
        j[3 + side] = limb(sh, a1, 0.5 * torso)
        j[5 + side] = limb(j[3 + side], a1 + sign * rng.uniform(-30, 110), 0.45 * torso)
        t1 = sign * rng.uniform(-15, 50)
        j[9 + side] = limb(hp, t1, 0.6 * torso)
        j[11 + side] = limb(j[9 + side], t1 - sign * rng.uniform(0, 80), 0.55 * torso)
    return j, torso


def _draw_image(rng: np.random.Generator, size: int, n_people: int):
    from PIL import Image, ImageDraw  # noqa: PLC0415 - optional heavy dependency (Pillow)

    base = rng.integers(40, 200, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    grad = np.linspace(-30, 30, size)[None, :, None] * rng.choice([-1, 1])
    bg = np.clip(base[None, None, :] + noise + grad, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):  # distractor strokes
        p = rng.uniform(0, size, size=4)
        draw.line([tuple(p[:2]), tuple(p[2:])], fill=tuple(int(v) for v in
                  rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    people = []
    for _ in range(n_people):
        joints, torso = _figure(rng, size)
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        width = max(2, int(round(torso / 7)))
        mask = Image.new("L", (size, size), 0)
        mdraw = ImageDraw.Draw(mask)
        neck = (joints[1] + joints[2]) / 2
        limbs = [*SKELETON, None]
        for pair in limbs:
            a, b = (neck, joints[0]) if pair is None else (joints[pair[0]], joints[pair[1]])
            for d, fill in ((draw, color), (mdraw, 255)):
                d.line([tuple(a), tuple(b)], fill=fill, width=width)
        r = 0.2 * torso
        for d, fill in ((draw, color), (mdraw, 255)):
            d.ellipse([joints[0][0] - r, joints[0][1] - r, joints[0][0] + r,
                       joints[0][1] + r], fill=fill)
        vis = np.full(13, 2, dtype=np.int64)
        if rng.random() < 0.35:  # an occluder over part of the figure
            c = joints[int(rng.integers(0, 13))] + rng.normal(0, 0.2 * torso, 2)
            half = rng.uniform(0.2, 0.45) * torso
            box = [c[0] - half, c[1] - half, c[0] + half, c[1] + half]
            draw.rectangle(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            mdraw.rectangle(box, fill=0)
            inside = ((joints[:, 0] >= box[0]) & (joints[:, 0] <= box[2])
                      & (joints[:, 1] >= box[1]) & (joints[:, 1] <= box[3]))
            vis[inside] = 1
        people.append((joints, vis, np.asarray(mask) > 0, torso))
    return np.asarray(img), people


def _annotation(joints: np.ndarray, vis: np.ndarray, mask: np.ndarray, torso: float,
                size: int, image_id: int, ann_id: int) -> dict:
    inside = ((joints[:, 0] >= 0) & (joints[:, 0] <= size - 1)
              & (joints[:, 1] >= 0) & (joints[:, 1] <= size - 1))
    vis = np.where(inside, vis, 0)
    kps = []
    for (x, y), v in zip(joints, vis, strict=True):
        kps += [round(float(x), 2), round(float(y), 2), int(v)] if v else [0, 0, 0]
    ys, xs = np.nonzero(mask)
    if len(xs):
        x0, y0 = float(xs.min()), float(ys.min())
        box = [x0, y0, float(xs.max()) - x0 + 1, float(ys.max()) - y0 + 1]
    else:
        box = [0.0, 0.0, 0.0, 0.0]
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "keypoints": kps, "num_keypoints": int((vis > 0).sum()), "bbox": box,
            "area": round(0.5 * box[2] * box[3], 2), "segmentation": []}


def make_synthetic_coco(out: str | Path, *, seed: int = 0, n_train_images: int = 1500,
                        n_val_images: int = 300, size: int = IMAGE_SIZE) -> Path:
    """Write the synthetic set into `out` (COCO layout); returns `out`. Deterministic in
    `seed`. About 1.5 figures per image."""
    from PIL import Image  # noqa: PLC0415 - optional heavy dependency (Pillow)

    out = Path(out)
    ann_id = 1
    image_id = 1
    for split, n_images in (("train", n_train_images), ("val", n_val_images)):
        rng = np.random.default_rng([int(seed), 0 if split == "train" else 1])
        (out / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for _ in range(n_images):
            n_people = 1 if rng.random() < 0.55 else 2
            pixels, people = _draw_image(rng, size, n_people)
            name = f"{image_id:012d}.png"
            Image.fromarray(pixels, "RGB").save(out / split / name)
            images.append({"id": image_id, "file_name": name, "width": size,
                           "height": size})
            for joints, vis, mask, torso in people:
                anns.append(_annotation(joints, vis, mask, torso, size, image_id, ann_id))
                ann_id += 1
            image_id += 1
        doc = {"info": {"description": f"ckd synthetic stick figures, seed {seed}"},
               "images": images, "annotations": anns,
               "categories": [{"id": 1, "name": "person", "supercategory": "person",
                               "keypoints": list(JOINTS),
                               "skeleton": [[a + 1, b + 1] for a, b in SKELETON]}]}
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "annotations" / f"person_keypoints_{split}.json",
                          json.dumps(doc) + "\n")
    return out
