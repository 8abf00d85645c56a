"""Pose commands: `ckd prepare coco-keypoints|synthetic-keypoints` (through `prepare`) and
the `ckd pose` group (train mentors, cache SimCC/heatmap rows, train students, evaluate)."""

from __future__ import annotations

from pathlib import Path

import click


def prepare_pose(kind: str, data_dir: str | None, out: str, seed: int | None,
                 input_size: str | None) -> None:
    """`ckd prepare coco-keypoints --data-dir DIR` / `ckd prepare synthetic-keypoints`."""
    from ckd.pose.coco import parse_input_size, prepare_coco_keypoints  # noqa: PLC0415

    size = parse_input_size(input_size or "64x48")
    if kind == "synthetic-keypoints":
        from ckd.pose.synthetic import make_synthetic_coco  # noqa: PLC0415

        data_dir = data_dir or str(Path(out) / "coco")
        make_synthetic_coco(data_dir, seed=0 if seed is None else seed)
        click.echo(f"wrote a synthetic COCO keypoint folder to {data_dir}")
    elif not data_dir:
        raise click.UsageError("coco-keypoints needs --data-dir DIR (the COCO folder holding "
                               "annotations/person_keypoints_*.json and the image folders)")
    try:
        meta = prepare_coco_keypoints(data_dir, out, input_size=size,
                                      name="synthetic-keypoints"
                                      if kind == "synthetic-keypoints" else None)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"{meta['name']}: {meta['n_train']} train + {meta['n_test']} test person "
               f"crops, {meta['num_joints']} joints, input {size[0]}x{size[1]}")
    click.echo(f"wrote {out}/train.beton, test.beton, meta.json; fingerprint "
               f"{meta['fingerprint']}")


commands: list[click.Command] = []
