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


def _kv(pairs: tuple[str, ...], what: str) -> dict:
    """KEY=VALUE pairs -> dict, values parsed as YAML scalars (numbers, true, null)."""
    import yaml  # noqa: PLC0415

    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=what)
        out[key.strip()] = yaml.safe_load(value)
    return out


@click.group("pose")
def pose_group() -> None:
    """2D human pose: train pose mentors and students, cache their rows, evaluate."""


@pose_group.command("train")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="A `ckd prepare coco-keypoints|synthetic-keypoints` folder.")
@click.option("--student", default="resnet8-simcc", show_default=True,
              help="<backbone>-simcc|heatmap (zoo backbone) or module.path:Class.")
@click.option("--student-kwargs", multiple=True, metavar="KEY=VALUE",
              help="Constructor keyword arguments (e.g. split_ratio=2.0).")
@click.option("--method", default="nokd", show_default=True,
              type=click.Choice(["nokd", "kd", "aver", "classroom"]))
@click.option("-p", "--param", "method_params", multiple=True, metavar="KEY=VALUE",
              help="Method parameter (kd: T, alpha_ce, alpha_kd; aver: tau; classroom: "
                   "tau, beta, delta, lam, granularity).")
@click.option("--cache", type=click.Path(exists=True, file_okay=False), default=None,
              help="A pose cache (`ckd cache-logits --prepared POSE_DIR ...`).")
@click.option("--mentor", "mentors", multiple=True, type=click.Path(exists=True),
              help="Online mentor checkpoint (repeat; the first is the teacher).")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=2e-3, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--views", default=4, show_default=True, type=click.IntRange(min=1),
              help="Online runs: keyed views per sample (a cache fixes its own).")
@click.option("--view-seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "triton", "reference"]),
              help="Distillation loss: fused Triton kernels (triton; auto on a GPU or under "
                   "TRITON_INTERPRET=1) or the eager reference.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--quiet", is_flag=True, help="No progress bars.")
def pose_train(data, student, student_kwargs, method, method_params, cache, mentors, epochs,
               batch_size, lr, seed, views, view_seed, backend, out, quiet) -> None:
    """Train a pose model (a mentor with --method nokd). Example: ckd pose train --data
    prepared/kp --student resnet8-simcc --method classroom --cache cache/kp --out runs/s"""
    from ckd.pose.train import train_pose  # noqa: PLC0415

    res = train_pose(dict(data=data, student=student,
                          student_kwargs=_kv(student_kwargs, "--student-kwargs"),
                          method=method, params=_kv(method_params, "--param"), cache=cache,
                          mentors=list(mentors), epochs=epochs, batch_size=batch_size, lr=lr,
                          seed=seed, slots=views, view_seed=view_seed, out=out,
                          progress=not quiet, backend=backend))
    m = res["metrics"]
    click.echo(f"{student} {method}: PCK@0.2 {m['pck']:.2f}  AP {m['AP']:.2f}  AP50 "
               f"{m['AP50']:.2f}  AR {m['AR']:.2f}; wrote {res['checkpoint']}")


def cache_pose(prepared: str, mentors: list[str], out: str, views: str, seed: int,
               batch_size: int, dtype: str, logits: str, quiet: bool) -> None:
    """`ckd cache-logits --prepared POSE_DIR --mentors a.pt,b.pt ...` on a pose set."""
    from ckd.pose.cache import build_pose_cache  # noqa: PLC0415
    from ckd.pose.coco import load_pose_prepared  # noqa: PLC0415

    if not str(views).isdigit():
        raise click.ClickException(f"--views {views}: pose views are continuous; give a number "
                                   "of keyed views per sample (e.g. --views 4)")
    ds = load_pose_prepared(prepared)
    path = build_pose_cache(ds, mentors, out, seed=seed, slots=int(views), dtype=dtype,
                            storage=logits, batch_size=batch_size, progress=not quiet)
    click.echo(f"pose cache {path}: {len(mentors)} mentor(s) x {views} view(s) x "
               f"{len(ds.train)} crops ({dtype}, {logits})")


def verify_pose(path: str, recompute: int, prepared: str | None) -> None:
    """`ckd cache verify PATH [--recompute N --prepared POSE_DIR]` on a pose cache."""
    from ckd.pose.verify import verify_pose_cache  # noqa: PLC0415

    try:
        problems = verify_pose_cache(path, recompute=recompute > 0, data=prepared,
                                     samples=max(1, recompute))
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    for p in problems[:50]:
        click.echo(f"  PROBLEM {p}", err=True)
    if problems:
        raise click.ClickException(f"{path}: {len(problems)} problem(s)")
    click.echo(f"{path}: OK" + (" (views re-derived" + (", rows and PCK recomputed)"
                                                         if prepared else ")")
                                if recompute else ""))


def is_pose_dir(path: str | None) -> bool:
    """A prepared pose set, a pose cache (root attribute kind "pose") or a pose cache of the
    older .npy layout (meta.json with task "pose": refused with its rebuild command)."""
    import json  # noqa: PLC0415

    root = Path(path or "")
    for name, key in (("meta.json", "task"), ("zarr.json", "kind")):
        try:
            meta = json.loads((root / name).read_text())
        except (OSError, ValueError):
            continue
        attrs = meta.get("attributes", {}) if name == "zarr.json" else meta
        if bool(path) and isinstance(attrs, dict) and attrs.get(key) == "pose":
            return True
    return False


@pose_group.command("eval")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False))
def pose_eval(checkpoint: str, data: str) -> None:
    """Flip-test PCK@0.2 and COCO AP of a pose checkpoint on the test crops."""
    from ckd.pose.coco import load_pose_prepared  # noqa: PLC0415
    from ckd.pose.mentors import load_pose_mentor  # noqa: PLC0415
    from ckd.pose.train import evaluate_pose  # noqa: PLC0415

    ds = load_pose_prepared(data)
    m = load_pose_mentor(checkpoint, ds)
    r = evaluate_pose(m.model, m.layout, ds)
    click.echo("  ".join(f"{k} {v:.2f}" for k, v in r.items()))


commands = [pose_group]
