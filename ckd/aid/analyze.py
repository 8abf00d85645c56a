"""`ckd analyze`: the KD loss between a cache's mentor and a trained student, over the
training set, split into its inter-class and intra-class parts (per class and overall)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from ckd.aid.decompose import COLUMNS, Decomposition, markdown_table
from ckd.cache import open_cache
from ckd.data.datasets import Dataset
from ckd.data.protocol import TrainingData
from ckd.data.views import apply_views
from ckd.train.config import load_config
from ckd.train.setup import open_data


def student_checkpoint(run_or_ckpt: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint, run folder or None): a run folder's student.pt, or a checkpoint file."""
    p = Path(run_or_ckpt)
    if p.is_dir():
        ckpt = p / "student.pt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{p} holds no student.pt: pass a finished run folder "
                                    "(`ckd train --out DIR`) or a checkpoint file")
        return ckpt, p
    if not p.is_file():
        raise FileNotFoundError(f"--student {p}: no such run folder or checkpoint")
    return p, None


def check_in_memory_data(ds: TrainingData, command: str) -> Dataset:
    """`ds`, unless its views are continuous (a prepared image folder's crops, not supported
    yet): the AID commands read whole in-memory image arrays with the discrete views."""
    if ds.recipe.num_views is None:
        raise ValueError(f"{command} works on CIFAR-style data (--dataset NAME, or --prepared "
                         f"from `ckd prepare cifar100|...`); {ds.name!r} is an image folder "
                         "(`ckd prepare imagefolder|imagenet`), which it does not support yet")
    return ds


def load_run_data(run_dir: Path | None, prepared: str | None, dataset: str | None,
                  dataset_options: dict[str, Any] | None, data_dir: str | None):
    """The dataset: from --prepared/--dataset, else the run's config.yaml."""
    if prepared is None and dataset is None:
        if run_dir is None or not (run_dir / "config.yaml").is_file():
            raise ValueError("which data? pass --prepared DIR or --dataset NAME (a student "
                             "checkpoint file does not record where its images are)")
        run = load_config(run_dir / "config.yaml")
        prepared, dataset, data_dir = run.prepared, run.dataset, run.data_dir
        dataset_options = run.dataset_options
    ds = open_data(dataset=dataset, prepared=prepared, data_dir=data_dir,
                   dataset_options=dataset_options)
    return check_in_memory_data(ds, "ckd analyze")


@torch.no_grad()
def decompose_over_train(cache_dir: str | Path, mentor: str, student: torch.nn.Module, ds,
                         T: float = 4.0, seed: int = 0, batch_size: int = 256,
                         epoch: int = 0) -> list[dict]:
    """Rows of `Decomposition.table()` for the cached mentor vs `student` on the training
    set, each sample on the view the cache pairs with it in `epoch` (mentor and student see
    the same image)."""
    cache = open_cache(cache_dir, mentors=[mentor])
    if cache.sparse:  # the decomposition needs every class's logit
        cache.close()
        raise ValueError(f"ckd analyze reads dense mentor logits, but mentor {mentor!r} in "
                         f"{cache_dir} is stored as {cache.logits_modes[mentor]}: analyze a "
                         "cache of it built with --logits dense")
    cache.check_compatible(ds.name, ds.fingerprint, ds.num_classes)
    student = student.eval()
    images = torch.from_numpy(ds.train.images)
    labels = torch.from_numpy(ds.train.labels)
    dec = Decomposition(ds.num_classes, T)
    for s in range(0, len(labels), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(labels)))
        slots, vids = cache.epoch_views(epoch, idx, seed)
        x = apply_views(images[idx], vids, ds.mean, ds.std)
        dec.add(cache.gather(slots, idx)[0].float(), student(x).float(), labels[idx])
    cache.close()
    return dec.table()


def write_analysis(rows: list[dict], out: str | Path, title: str) -> dict[str, Path]:
    """analysis.md, analysis.csv and analysis.png (stacked inter + intra bars per class)."""
    import matplotlib  # noqa: PLC0415 - plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - optional heavy dependency (matplotlib)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path, png = out / "analysis.md", out / "analysis.csv", out / "analysis.png"
    md.write_text(f"{title}\n\n{markdown_table(rows)}\n")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: r[k] for k in COLUMNS} for r in rows)
    names = [r["class"] for r in rows]
    inter = [r["inter"] for r in rows]
    intra = [r["intra"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 2), 4))
    ax.bar(names, inter, label="inter-class similarity")
    ax.bar(names, intra, bottom=inter, label="intra-class distribution")
    ax.plot(names, [r["mentor_spread"] for r in rows], "k.", label="mentor intra spread")
    ax.set_xlabel("class")
    ax.set_ylabel("KD loss part (T^2 KL)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return {"md": md, "csv": csv_path, "png": png}
