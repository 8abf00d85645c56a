"""Contrastive Representation Distillation (CRD) and TeKAP's feature level on top of it:
the trainable module and the loss that their declarations (`ckd.methods.feature`) use.

Eager reference of RepDistiller's `crd/` (criterion.py, memory.py) as one module:

- two embeddings (Linear + L2 normalisation) map the student's and the teacher's pooled
  features to `feat_dim`;
- two memories of `n_data x feat_dim` (one per side) hold a momentum average of every
  training sample's embedding; they supply `nce_k` negatives per sample;
- NCE loss (the paper's Eq. 18) on both anchors: teacher embedding against the student
  memory and student embedding against the teacher memory.

Differences to RepDistiller, by design:
- negatives come from ckd's counter-based generator keyed by (seed, step, sample, k), so a
  resumed run draws the same ones, and are drawn on the device from the other classes
  (RepDistiller's default `--mode exact`), without replacement when nce_k fits in them (a
  keyed permutation instead of `np.random.choice(..., replace=False)`), without a
  per-sample Python list;
- under DDP the memory update sees every rank's batch (all-gather), so the memories stay
  identical on all ranks (RepDistiller runs on one process).

TeKAP's feature level (their `crd/criterion.py`) perturbs the teacher feature before the
teacher embedding: `copy_i = (1 - a) f_t + a * noise_std * eta_i`, and adds, per copy, a
second contrast pass whose loss is `s_loss + t_loss_i` (the student term of the clean pass
counted again, as in the authors' `loss + loss_1`); each pass updates the memories.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ckd.hashing import M32, mix32, permute_below
from ckd.kernels.rng import stream_key, tekap_noise

EPS = 1e-7  # RepDistiller's eps in ContrastLoss
STREAM_CRD = 0x0C7D5A11  # negatives
STREAM_TEKAP_FEATURE = 0x7E4AF3A7  # TeKAP's feature noise (independent of its logit noise)


class Embed(nn.Module):
    """Linear projection followed by L2 normalisation (RepDistiller's `Embed`)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x.flatten(1))
        return x / x.pow(2).sum(1, keepdim=True).sqrt()


def nce_loss(scores: Tensor, n_data: int) -> Tensor:
    """RepDistiller's ContrastLoss: column 0 holds the positive, the rest the negatives."""
    bsz, m = scores.shape[0], scores.shape[1] - 1
    noise = m / float(n_data)
    log_d1 = torch.log(scores[:, 0] / (scores[:, 0] + noise + EPS))
    log_d0 = torch.log(noise / (scores[:, 1:] + noise + EPS))
    return -(log_d1.sum() + log_d0.sum()) / bsz


def draw_negatives(seed: int, step: int, labels: Tensor, nce_k: int,
                   by_class: Tensor, class_start: Tensor, class_count: Tensor) -> Tensor:
    """[B, nce_k] dataset indices of samples from another class than each label, drawn as
    RepDistiller draws them: without replacement when nce_k is at most the number of
    other-class samples, else independently (with replacement).

    `by_class` lists the training set's indices sorted by label, class c occupying
    `[class_start[c], class_start[c] + class_count[c])`; a position among the other
    classes' n - count[y] samples skips over class y's block. Without replacement the
    positions are the first nce_k of a permutation of them keyed by (seed, step, row)
    (`ckd.hashing.permute_below`), so a resumed or a cached run draws the same.
    """
    n = by_class.numel()
    root = stream_key(STREAM_CRD, seed, step)
    b = torch.arange(labels.shape[0], device=labels.device, dtype=torch.int64).view(-1, 1)
    k = torch.arange(nce_k, device=labels.device, dtype=torch.int64).view(1, -1)
    row_key = mix32((root ^ b) & M32)
    others = (n - class_count[labels]).view(-1, 1).clamp_min(1)
    distinct = others >= nce_k  # RepDistiller: replace = k > len(cls_negative[target])
    if bool(distinct.all()):
        pos = permute_below(row_key, k, others)
    else:
        pos = torch.where(distinct, permute_below(row_key, torch.where(distinct, k, 0), others),
                          mix32(row_key ^ k) % others)
    start = class_start[labels].view(-1, 1)
    pos = torch.where(pos >= start, pos + class_count[labels].view(-1, 1), pos)
    return by_class[pos.clamp_max(n - 1)]


class CRDModule(nn.Module):
    """CRD's trainable and stateful parts: embeddings (parameters), memories, normalising
    constants and the class index used to draw negatives (buffers, saved in checkpoints)."""

    def __init__(self, s_dim: int, t_dim: int, train_labels: Tensor, *, feat_dim: int = 128,
                 nce_k: int = 16384, nce_t: float = 0.07, nce_m: float = 0.5) -> None:
        super().__init__()
        n_data = int(train_labels.numel())
        self.n_data, self.nce_k, self.nce_t, self.nce_m = n_data, nce_k, nce_t, nce_m
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n_data, feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("memory_t", torch.rand(n_data, feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("z", torch.full((2,), -1.0))  # Z_s, Z_t; set on the first step
        labels = train_labels.to(torch.int64).cpu()
        num_classes = int(labels.max()) + 1 if n_data else 0
        count = torch.bincount(labels, minlength=num_classes)
        self.register_buffer("by_class", torch.argsort(labels, stable=True))
        self.register_buffer("class_count", count)
        self.register_buffer("class_start", torch.cumsum(count, 0) - count)
        if n_data and int(count.max()) == n_data:
            raise ValueError("crd needs at least two classes in the training set "
                             "(its negatives come from the other classes)")
        self._z_ready = [False, False]  # host-side: Z is read once, not every step

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._z_ready = [False, False]

    def memory_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.memory_s, self.memory_t))

    def negatives(self, labels: Tensor, idx: Tensor, seed: int, step: int) -> Tensor:
        """[B, 1 + nce_k]: each sample's own index, then its negatives."""
        neg = draw_negatives(seed, step, labels, self.nce_k, self.by_class,
                             self.class_start, self.class_count)
        return torch.cat([idx.view(-1, 1).to(torch.int64), neg], 1)

    def _scores(self, memory: Tensor, v: Tensor, contrast_idx: Tensor, which: int) -> Tensor:
        """exp(<memory rows, v> / T) / Z for the positive and the negatives: [B, 1 + K]."""
        rows = memory[contrast_idx].detach()  # [B, K + 1, D]
        out = torch.exp(torch.bmm(rows, v.unsqueeze(2)).squeeze(2) / self.nce_t)
        if not self._z_ready[which] and float(self.z[which]) < 0:
            # RepDistiller: set once from the first batch
            with torch.no_grad():
                z = out.detach().mean() * self.n_data
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(z)  # one constant on every rank
                    z /= torch.distributed.get_world_size()
                self.z[which] = z
        self._z_ready[which] = True
        return out / self.z[which].clone()  # a copy: z is written in place later

    @torch.no_grad()
    def _update(self, memory: Tensor, v: Tensor, idx: Tensor) -> None:
        v, idx = _gather(v.detach()), _gather(idx)
        rows = memory[idx] * self.nce_m + v * (1 - self.nce_m)
        memory.index_copy_(0, idx, rows / rows.pow(2).sum(1, keepdim=True).sqrt())

    def contrast(self, v_s: Tensor, v_t: Tensor, idx: Tensor,
                 contrast_idx: Tensor) -> tuple[Tensor, Tensor]:
        """One pass of RepDistiller's ContrastMemory: the student-anchor and the
        teacher-anchor NCE losses, then the momentum update of both memories."""
        out_s = self._scores(self.memory_t, v_s, contrast_idx, 0)  # student vs teacher memory
        out_t = self._scores(self.memory_s, v_t, contrast_idx, 1)  # teacher vs student memory
        self._update(self.memory_s, v_s, idx)
        self._update(self.memory_t, v_t, idx)
        return nce_loss(out_s, self.n_data), nce_loss(out_t, self.n_data)


def _gather(t: Tensor) -> Tensor:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def crd_loss(module: CRDModule, f_s: Tensor, f_t: Tensor, labels: Tensor, idx: Tensor, *,
             seed: int, step: int) -> tuple[Tensor, dict[str, Tensor]]:
    """CRD: student-anchor + teacher-anchor NCE (RepDistiller's CRDLoss)."""
    contrast_idx = module.negatives(labels, idx, seed, step)
    v_s, v_t = module.embed_s(f_s.float()), module.embed_t(f_t.float())
    s_loss, t_loss = module.contrast(v_s, v_t, idx, contrast_idx)
    return s_loss + t_loss, {"crd_s": s_loss.detach(), "crd_t": t_loss.detach()}


def tekap_feature_copies(f_t: Tensor, *, seed: int, step: int, n_copies: int, a: float,
                         noise_std: float) -> Tensor:
    """[n_copies, B, D]: `(1 - a) f_t + a * noise_std * eta` with eta from ckd's
    counter-based generator (a feature stream of its own, keyed by seed and step)."""
    eta = tekap_noise(seed ^ STREAM_TEKAP_FEATURE, step, f_t.shape[0], f_t[0].numel(),
                      n_copies, device=f_t.device)
    flat = f_t.float().flatten(1)
    return (1 - a) * flat.unsqueeze(0) + (a * noise_std) * eta


def tekap_feature_loss(module: CRDModule, f_s: Tensor, f_t: Tensor, labels: Tensor,
                       idx: Tensor, *, seed: int, step: int, n_copies: int = 1,
                       a: float = 0.1, noise_std: float = 0.1, lam_clean: float = 1.0,
                       lam_noisy: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """TeKAP (F): CRD on the clean teacher feature plus one contrast pass per noisy copy;
    defaults as the authors' code (one copy, 0.9 f + 0.1 * N(0, 0.1^2), `loss + loss_1`)."""
    contrast_idx = module.negatives(labels, idx, seed, step)
    v_s = module.embed_s(f_s.float())
    s_loss, t_loss = module.contrast(v_s, module.embed_t(f_t.float()), idx, contrast_idx)
    loss = lam_clean * (s_loss + t_loss)
    noisy = f_s.new_zeros(())
    for copy in tekap_feature_copies(f_t, seed=seed, step=step, n_copies=n_copies, a=a,
                                     noise_std=noise_std):
        _, t_loss_i = module.contrast(v_s, module.embed_t(copy), idx, contrast_idx)
        noisy = noisy + t_loss_i
        loss = loss + lam_noisy * (s_loss + t_loss_i)
    return loss, {"crd_s": s_loss.detach(), "crd_t": t_loss.detach(),
                  "tekap_t_noisy": noisy.detach() / max(n_copies, 1)}
