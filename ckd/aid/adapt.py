"""`ckd adapt-mentor`: fine-tune a trained mentor so that its intra-class distribution suits
a given student architecture, keeping its accuracy (the project's reading of AID; the
objective, its equations and the alternatives are in docs/AID.md).

Two phases on the training set, with the training views (the view rule of `ckd train`):

1. warm-up: a proxy student of the target architecture learns from the frozen mentor
   with KD (what the student will do later);
2. adaptation: mentor and proxy are trained side by side; per batch, the proxy takes a KD
   step from the current mentor, and the mentor takes a step on

       L = CE(z^t, y) + lam * intra(t || sg(s)) + anchor * inter(t0 || t)

   where intra is the intra-class part of the KD loss against the proxy (the part a
   student of this size fails to fit; the mentor moves its per-sample distributions toward
   what the student manages), inter(t0 || t) keeps the class-mean soft labels of the
   original mentor t0 (its inter-class similarity), and CE keeps it accurate.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ckd.aid.analyze import check_in_memory_data
from ckd.aid.decompose import inter_class_kl, intra_class_kl
from ckd.cache.mentors import parse_mentor_value
from ckd.cache.writer import test_accuracy
from ckd.data.loaders import make_loader
from ckd.data.views import apply_views
from ckd.models import (
    create_model,
    file_sha256,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from ckd.train.setup import open_data
from ckd.train.tensorboard import TensorBoardLog

OBJECTIVE = "aid-intra"


def _kd(student_logits: torch.Tensor, mentor_logits: torch.Tensor, labels: torch.Tensor,
        T: float) -> torch.Tensor:
    """The proxy's loss: CE + T^2 KL(mentor_T || student_T) (the `kd` method's form)."""
    kl = F.kl_div(F.log_softmax(student_logits / T, -1), F.log_softmax(mentor_logits / T, -1),
                  reduction="batchmean", log_target=True)
    return F.cross_entropy(student_logits, labels) + T * T * kl


def adapt_mentor(arch: str | None, checkpoint: str | Path, student: str, out: str | Path, *,
                 dataset: str | None = None, prepared: str | None = None,
                 data_dir: str | None = None, dataset_options: dict[str, Any] | None = None,
                 epochs: int = 10, warmup_epochs: int | None = None, lam: float = 1.0,
                 anchor: float = 1.0, T: float = 4.0, lr: float = 0.005,
                 student_lr: float = 0.05, batch_size: int = 64, seed: int = 0,
                 margin: float = 1.0, device: str = "cpu", progress: bool = True,
                 overwrite: bool = False, tensorboard: str | None = None) -> dict[str, Any]:
    """Write the adapted mentor to `out` (ckd checkpoint; metrics record the source
    checkpoint and its sha256, the student, the objective and its parameters, both test
    accuracies). Returns that record plus `model`. An existing `out` is replaced only with
    `overwrite`."""
    check_adapt_values(epochs=epochs, lam=lam, anchor=anchor, tau=T, lr=lr,
                       student_lr=student_lr, margin=margin)
    warmup_epochs = epochs if warmup_epochs is None else warmup_epochs
    # --checkpoint timm:MODEL:FILE, torchvision:ARCH:FILE or module.path:Class:FILE
    spec_arch, checkpoint = parse_mentor_value(str(checkpoint))
    arch = arch or spec_arch
    out = Path(out)
    if out.resolve() == checkpoint.resolve():
        raise ValueError(f"--out {out} would overwrite the source mentor: choose another path")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists (another mentor's checkpoint, a "
                              "cache may record its hash): pass --overwrite to replace it, "
                              "or choose another --out")
    dev = torch.device(device)
    ds = check_in_memory_data(open_data(dataset=dataset, prepared=prepared,
                                        data_dir=data_dir, dataset_options=dataset_options),
                              "ckd adapt-mentor")
    meta = read_checkpoint_meta(checkpoint)
    arch = arch or meta.get("arch")
    if arch is None:
        raise ValueError(f"{checkpoint} does not record its architecture: pass --arch")
    torch.manual_seed(seed)
    original = load_checkpoint(checkpoint, arch=arch, num_classes=ds.num_classes).to(dev)
    original.requires_grad_(False)
    mentor = copy.deepcopy(original).train().requires_grad_(True)
    proxy = create_model(student, ds.num_classes).to(dev)
    opt_t = torch.optim.SGD(mentor.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    opt_s = torch.optim.SGD(proxy.parameters(), lr=student_lr, momentum=0.9, weight_decay=5e-4)
    loader = make_loader("memory", ds.train, batch_size=batch_size, seed=seed, device=str(dev))

    def acc(model: torch.nn.Module) -> float:
        model.eval()
        a = test_accuracy(model, ds.test.images, ds.test.labels, ds.mean, ds.std, 256, dev)
        return a

    board = None
    if tensorboard is not None:  # per adaptation epoch: its loss terms; then the accuracy
        board = TensorBoardLog(tensorboard, out.stem)
    acc_before = acc(original)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    total = warmup_epochs + epochs
    for epoch in range(total):
        adapting = epoch >= warmup_epochs
        loader.set_epoch(epoch)
        proxy.train()
        mentor.train(adapting)  # warm-up: the mentor is frozen, BN in eval mode
        sums = {"intra": 0.0, "inter": 0.0, "ce": 0.0, "n": 0}
        bar = tqdm(loader, desc=f"adapt-mentor {'adapt' if adapting else 'warm-up'} "
                   f"{epoch + 1}/{total}", leave=False, disable=not progress)
        for images, labels, idx in bar:
            x = apply_views(images, ds.recipe.epoch_view_ids(seed, epoch, idx), ds.mean, ds.std)
            with torch.set_grad_enabled(adapting):
                z_t = mentor(x)
            z_s = proxy(x)
            opt_s.zero_grad(set_to_none=True)
            _kd(z_s, z_t.detach(), labels, T).backward()
            opt_s.step()
            if not adapting:
                continue
            with torch.no_grad():
                z_0 = original(x)
            ce = F.cross_entropy(z_t, labels)
            intra = intra_class_kl(z_t, z_s.detach(), labels, T)
            inter = inter_class_kl(z_0, z_t, labels, T)
            opt_t.zero_grad(set_to_none=True)
            (ce + lam * intra + anchor * inter).backward()
            opt_t.step()
            b = labels.shape[0]
            sums["intra"] += float(intra.detach()) * b
            sums["inter"] += float(inter.detach()) * b
            sums["ce"] += float(ce.detach()) * b
            sums["n"] += b
        if adapting:
            n = max(1, sums["n"])
            rec = {"epoch": epoch, "ce": sums["ce"] / n, "intra": sums["intra"] / n,
                   "inter_drift": sums["inter"] / n}
            history.append(rec)
            if board is not None:
                board.record({"type": "step", "step": epoch, "lr": lr, "ce": rec["ce"],
                              "intra": rec["intra"], "inter_drift": rec["inter_drift"],
                              "step_s": (time.perf_counter() - t0) / (epoch + 1)})
            if progress:
                tqdm.write(f"adapt epoch {epoch - warmup_epochs + 1}/{epochs}: ce "
                           f"{rec['ce']:.4f} intra {rec['intra']:.4f} "
                           f"inter drift {rec['inter_drift']:.4f}")
    acc_after = acc(mentor)
    if board is not None:
        board.record({"type": "epoch", "step": 0, "test_acc": acc_before})
        board.record({"type": "epoch", "step": total, "test_acc": acc_after})
        board.close()
    drop = acc_before - acc_after
    record = {
        "test_acc": acc_after, "source_test_acc": acc_before, "accuracy_drop": drop,
        "margin": margin, "within_margin": drop <= margin,
        "adapted_from": {"checkpoint": str(checkpoint), "sha256": file_sha256(checkpoint),
                         "arch": arch},
        "adapted_for": {"student": student},
        "objective": OBJECTIVE,
        "params": {"lam": lam, "anchor": anchor, "T": T, "epochs": epochs,
                   "warmup_epochs": warmup_epochs, "lr": lr, "student_lr": student_lr,
                   "batch_size": batch_size, "seed": seed},
        "history": history, "time_s": time.perf_counter() - t0,
    }
    save_checkpoint(out, mentor.eval(), arch=arch, num_classes=ds.num_classes,
                    dataset=ds.name, metrics=record)
    warning = accuracy_warning(acc_before, acc_after, margin, out)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return {**record, "out": str(out), "model": mentor}


def check_adapt_values(*, epochs: int, lam: float, anchor: float, tau: float, lr: float,
                       student_lr: float, margin: float) -> None:
    """Refuse, before any work, a value that would train a NaN mentor or judge it wrongly:
    every float finite, the rates and the temperature positive, the weights non-negative."""
    floats = {"--lam": lam, "--anchor": anchor, "--tau": tau, "--lr": lr,
              "--student-lr": student_lr, "--margin": margin}
    bad = [f"{k} {v}" for k, v in floats.items() if not math.isfinite(v)]
    bad += [f"{k} {v}" for k, v in (("--tau", tau), ("--lr", lr), ("--student-lr", student_lr))
            if math.isfinite(v) and v <= 0]
    bad += [f"{k} {v}" for k, v in (("--lam", lam), ("--anchor", anchor), ("--margin", margin))
            if math.isfinite(v) and v < 0]
    if epochs < 1:
        bad.append(f"--epochs {epochs}")
    if bad:
        raise ValueError(f"adapt-mentor: {', '.join(bad)} invalid: needs finite values with "
                         "--epochs >= 1, --tau, --lr, --student-lr > 0 and --lam, --anchor, "
                         "--margin >= 0")


def accuracy_warning(acc_before: float, acc_after: float, margin: float,
                     out: str | Path) -> str | None:
    """The loud end-of-run report when the adapted mentor lost more than `margin` points."""
    drop = acc_before - acc_after
    if drop <= margin:
        return None
    line = "!" * 78
    return (f"\n{line}\n!! adapt-mentor: the adapted mentor LOST {drop:.2f} points of test "
            f"top-1\n!! ({acc_before:.2f}% -> {acc_after:.2f}%), more than the allowed "
            f"--margin {margin:.2f}.\n!! It was written to {out}, but do not cache it as is: "
            "lower --lam, raise --anchor,\n!! or use fewer --epochs.\n" + line + "\n")
