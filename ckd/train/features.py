"""What a training run with feature terms needs beside the loop: which mentor features to
read, the methods' trainable modules (built from the feature shapes, in the optimizer,
in checkpoints, synchronised under DDP) and the per-step inputs handed to their losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ckd.cache.rows import RowSource
from ckd.data.protocol import TrainingData
from ckd.methods.compose import LossPlan, Term
from ckd.models import feature_shapes, infer_arch
from ckd.models.registry import arch_spec, is_import_path
from ckd.train.config import TrainConfig
from ckd.train.setup import input_size

FEATURE_INPUTS = ("pool", "map")  # what a method may read from the mentors besides logits
MODULES_KEY = "method_modules"  # training-checkpoint entry of the methods' modules


@dataclass(frozen=True)
class BuildContext:
    """What module builders may need besides shapes (CRD: one memory row per sample)."""

    train_labels: Tensor  # [N] int64, the training set's labels (index = dataset index)
    num_classes: int
    seed: int


def feature_needs(terms: Sequence[Term]) -> tuple[str, ...]:
    """The mentor feature arrays the terms read (subset of FEATURE_INPUTS, in that order)."""
    want = {i for t in terms for i in getattr(t.method, "inputs", ()) if i in FEATURE_INPUTS}
    return tuple(i for i in FEATURE_INPUTS if i in want)


def module_summary(modules: nn.Module | None) -> dict[str, Any]:
    """Parameter count and buffer bytes (CRD's memories) of the methods' modules."""
    if modules is None:
        return {"params": 0, "buffer_bytes": 0}
    return {"params": sum(p.numel() for p in modules.parameters()),
            "buffer_bytes": sum(b.numel() * b.element_size() for b in modules.buffers())}


def check_module_state(state: dict[str, Any], modules: nn.Module | None, method: str,
                       run_dir: str) -> None:
    """Refuse to resume a run whose checkpoint lacks (or has other) method modules."""
    saved = state.get(MODULES_KEY)
    if modules is None:
        if saved:
            raise ValueError(f"--resume: {run_dir}/checkpoint.pt holds the trainable modules "
                             f"of a feature method ({sorted(saved)[:3]} ...) that --method "
                             f"{method} does not have; resume with the method it was trained "
                             "with (its config.yaml), or start a new run with another --out")
        return
    if saved is None:
        raise ValueError(f"--resume: {run_dir}/checkpoint.pt holds no trainable modules for "
                         f"--method {method} (it was trained without them); start a new run "
                         "with another --out")
    want, have = set(modules.state_dict()), set(saved)
    if want != have:
        missing = sorted(want - have)[:4]
        extra = sorted(have - want)[:4]
        raise ValueError(f"--resume: the method modules in {run_dir}/checkpoint.pt do not fit "
                         f"--method {method} (missing {missing}, unexpected {extra}); resume "
                         "with the method it was trained with, or start a new --out")
    current = modules.state_dict()
    changed = [f"{k} {tuple(saved[k].shape)} -> {tuple(current[k].shape)}" for k in sorted(want)
               if tuple(saved[k].shape) != tuple(current[k].shape)]
    if changed:
        raise ValueError(f"--resume: the method modules in {run_dir}/checkpoint.pt have other "
                         f"shapes than --method {method} builds now ({'; '.join(changed[:3])}): "
                         "a method parameter that sizes them (e.g. crd.feat_dim) changed; "
                         "resume with the parameters it was trained with (its config.yaml), "
                         "or start a new --out")


def sync_module_grads(modules: nn.Module | None) -> None:
    """Average the modules' gradients over the ranks (the student's own gradients are
    averaged by DDP; these parameters live outside its forward)."""
    if modules is None or not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    grads = [p.grad for p in modules.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def student_feature_shapes(student: nn.Module, name: str,
                           image_size: int) -> tuple[tuple[int, ...], ...]:
    """Per-sample shapes of the student's own `forward(x, is_feat=True)` features, from a
    dry forward of two blank images through the built model: its constructor keywords
    (--student-kwargs) and outside `module:Class` students count, not a zoo default."""
    p = next(student.parameters(), None)
    x = torch.zeros(2, 3, image_size, image_size, device=None if p is None else p.device)
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            feats, _ = student(x, is_feat=True)
    except Exception as err:  # noqa: BLE001 - any failure means no usable features
        raise ValueError(
            f"student {name!r}: feature methods read the student's features, but "
            f"forward(x, is_feat=True) failed ({type(err).__name__}: {err}); give the class "
            "an `is_feat` keyword returning (list of features, logits) with the pooled "
            "feature last, as the zoo models do (`ckd models`), or use a logit method"
        ) from err
    finally:
        student.train(was_training)
    return tuple(tuple(f.shape[1:]) for f in feats)


def student_classifier(student: nn.Module, name: str,
                       shapes: Sequence[tuple[int, ...]]) -> nn.Module | None:
    """The student's final Linear (the zoo's declared one; for an outside class the last
    Linear reading the pooled feature), or None when it has none."""
    named = dict(student.named_modules())
    if not is_import_path(name):
        return named[arch_spec(name).classifier]
    dim = shapes[-1][0] if shapes and shapes[-1] else None
    linears = [m for m in named.values() if isinstance(m, nn.Linear) and m.in_features == dim]
    return linears[-1] if linears else None


class FeatureRun:
    """The feature terms of one run: their modules on the device (in the optimizer, the
    checkpoint and synchronised under DDP) and the per-step `extra` for their losses."""

    def __init__(self, plan: LossPlan, student: nn.Module, student_arch: str,
                 mentor_shapes: Sequence[Sequence[tuple[int, ...]]], context: BuildContext,
                 image_size: int, device: torch.device) -> None:
        self.needs = feature_needs(plan.terms)
        # logit-only methods never look at the student's features
        uses = bool(self.needs) or any(t.method.build_modules for t in plan.terms)
        self.student_shapes = student_feature_shapes(student, student_arch, image_size) \
            if uses else ()
        built = plan.build_modules(self.student_shapes, mentor_shapes, context) if uses \
            else None
        self.modules = None if built is None else built.to(device)
        self.classifier = student_classifier(student, student_arch, self.student_shapes) \
            if uses else None

    @property
    def active(self) -> bool:
        return bool(self.needs) or self.modules is not None

    def summary(self) -> dict[str, Any]:
        return {"features": list(self.needs), **module_summary(self.modules)}

    def param_group(self, lr: float, momentum: float, weight_decay: float) -> list[dict]:
        """The modules' parameters as one SGD group, optimised like the student (as
        RepDistiller's `trainable_list`)."""
        if self.modules is None:
            return []
        params = [p for p in self.modules.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "momentum": momentum,
                 "weight_decay": weight_decay}] if params else []

    def extra(self, student_feats: Sequence[Tensor] | None,
              mentor_feats: dict[str, Sequence[Tensor]] | None, idx: Tensor) -> dict[str, Any]:
        """`inputs.extra` of the feature terms' losses."""
        if not self.active:
            return {}
        out: dict[str, Any] = {"student_features": student_feats, "idx": idx,
                               "classifier": self.classifier}
        for name, tensors in (mentor_feats or {}).items():
            out[f"mentor_{name}"] = tensors
        return out


def make_feature_run(cfg: TrainConfig, plan: LossPlan, ds: TrainingData, source: Any,
                     student: nn.Module, device: torch.device) -> FeatureRun:
    """The run's feature terms, their modules built from the student's and the mentors'
    feature shapes (mentors: their architectures online, the cache's arrays cached)."""
    image_size = input_size(cfg, ds)
    mentor_shapes = []
    if feature_needs(plan.terms) or any(t.method.build_modules for t in plan.terms):
        if getattr(source, "models", None):  # online: from the mentors' architectures
            for m in source.models:
                mentor_shapes.append(feature_shapes(infer_arch(m.state_dict()), image_size))
        elif getattr(source, "cache", None) is not None:
            mentor_shapes = cached_mentor_shapes(source.cache, image_size)
    labels = torch.as_tensor(ds.train.labels, dtype=torch.int64)
    context = BuildContext(labels, ds.num_classes, cfg.seed)
    return FeatureRun(plan, student, cfg.student, mentor_shapes, context, image_size, device)


def cached_mentor_shapes(cache: RowSource, image_size: int) -> list[tuple[tuple[int, ...], ...]]:
    """Each cached mentor's feature shapes (its architecture's `is_feat` shapes, with the
    cached pool/map shapes checked against them: a mismatch is refused by name)."""
    out = []
    for j, alias in enumerate(cache.mentors):
        arch = cache.mentor_meta[alias].get("arch")
        shapes = feature_shapes(arch, image_size,
                                **(cache.mentor_meta[alias].get("arch_kwargs") or {}))
        expect = {"pool": tuple(shapes[-1]), "map": tuple(shapes[-2])}
        for name, per_mentor in cache.feature_shapes.items():
            if tuple(per_mentor[j]) != expect[name]:
                raise ValueError(
                    f"the cache {cache.path} holds {name} features of shape "
                    f"{tuple(per_mentor[j])} for mentor {alias!r}, but its architecture {arch} "
                    f"gives {expect[name]} at {image_size}x{image_size}: rebuild that mentor "
                    f"with `ckd cache-logits --out {cache.path} --mentors {alias}=CHECKPOINT "
                    f"--features {name} --overwrite`")
        out.append(shapes)
    return out
