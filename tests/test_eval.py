"""`ckd eval CHECKPOINT`: top-1/top-5 and mean CE of a checkpoint on a split, printed and
appended as one JSON line; the mentor specs name the model; a split the data does not
hold is one line naming the ones it does."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from click.testing import CliRunner

from ckd.data import load_dataset
from ckd.data.views import IDENTITY_VIEW, apply_views
from ckd.models import create_model, save_checkpoint


def _ckd(*args):
    from ckd.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_eval_a_checkpoint_on_a_bundled_set(tmp_path):
    ds = load_dataset("synthetic")
    torch.manual_seed(0)
    model = create_model("resnet8", ds.num_classes).eval()
    ckpt = save_checkpoint(tmp_path / "r8.pt", model, arch="resnet8",
                           num_classes=ds.num_classes, dataset=ds.name, metrics=None)
    out = tmp_path / "evals" / "eval.jsonl"
    res = _ckd("eval", ckpt, "--dataset", "synthetic", "--device", "cpu", "--out", out)
    assert res.exit_code == 0, res.output
    rec = json.loads(out.read_text().splitlines()[-1])
    # the same numbers computed here from the test images
    x = apply_views(torch.from_numpy(ds.test.images),
                    torch.full((len(ds.test.labels),), IDENTITY_VIEW), ds.mean, ds.std)
    y = torch.from_numpy(ds.test.labels)
    with torch.no_grad():
        logits = model(x)
    top = logits.topk(5, 1).indices
    assert rec["images"] == len(y) and rec["arch"] == "resnet8" and rec["split"] == "val"
    assert abs(rec["top1"] - 100.0 * float((top[:, 0] == y).float().mean())) < 1e-3
    assert abs(rec["top5"] - 100.0 * float((top == y[:, None]).any(1).float().mean())) < 1e-3
    assert abs(rec["loss"] - float(F.cross_entropy(logits, y))) < 1e-4
    assert "top-1" in res.output and json.dumps(rec, sort_keys=True) in res.output
    # a second run appends a line
    assert _ckd("eval", ckpt, "--dataset", "synthetic", "--device", "cpu", "--out",
                out).exit_code == 0
    assert len(out.read_text().splitlines()) == 2


def test_eval_takes_mentor_specs_and_refuses_a_missing_split(tmp_path):
    ds = load_dataset("synthetic")
    torch.manual_seed(0)
    sd = tmp_path / "r18.pth"
    torch.save(create_model("resnet18", ds.num_classes).state_dict(), sd)
    res = _ckd("eval", f"torchvision:resnet18:{sd}", "--dataset", "synthetic", "--device",
               "cpu", "--out", tmp_path / "e.jsonl")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "e.jsonl").read_text())["arch"] == "torchvision:resnet18"
    res = _ckd("eval", f"torchvision:resnet18:{sd}", "--dataset", "synthetic", "--split",
               "holdout", "--out", tmp_path / "e.jsonl")
    assert res.exit_code == 1
    assert "--split 'holdout' is not in synthetic" in res.output
    assert "--split val or --split train" in res.output
