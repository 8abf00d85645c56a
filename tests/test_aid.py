"""AID: the KD-loss decomposition (exact, non-negative, streaming == batch), adapt-mentor
(metadata, checkpoint cache-logits can use, the loud margin report) and `ckd analyze`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from ckd.aid import Decomposition, inter_class_kl, intra_class_kl
from ckd.cli.main import main as cli

TINY = dict(n_train=48, n_test=24, num_classes=4, seed=0)


def _naive(zt, zs, y, T):
    """Per class, straight from the definition: mean_i KL_i and KL of the class means."""
    out = {}
    for c in y.unique().tolist():
        pt, ps = F.softmax(zt[y == c] / T, -1), F.softmax(zs[y == c] / T, -1)
        kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
        mt, ms = pt.mean(0), ps.mean(0)
        inter = (mt * (mt.log() - ms.log())).sum()
        out[c] = (T * T * kl, T * T * inter)
    return out


def test_decomposition_is_exact_and_nonnegative():
    g = torch.Generator().manual_seed(0)
    zt, zs = torch.randn(60, 5, generator=g) * 3, torch.randn(60, 5, generator=g) * 2
    y = torch.randint(0, 5, (60,), generator=g)
    dec = Decomposition(5, T=2.0)
    for s in range(0, 60, 16):  # streamed in uneven batches
        dec.add(zt[s:s + 16].double(), zs[s:s + 16].double(), y[s:s + 16])
    rows = {r["class"]: r for r in dec.table()}
    want = _naive(zt.double(), zs.double(), y, 2.0)
    for c, (kd, inter) in want.items():
        r = rows[str(c)]
        assert r["kd"] == pytest.approx(float(kd), rel=1e-9)
        assert r["inter"] == pytest.approx(float(inter), rel=1e-9)
        assert r["inter"] >= 0 and r["intra"] >= -1e-12
        assert r["inter"] + r["intra"] == pytest.approx(r["kd"], rel=1e-9)
    # the batch form used in adapt-mentor: intra over the batch = the sample-weighted rows
    total_intra = sum(rows[str(c)]["intra"] * rows[str(c)]["n"] for c in want) / 60
    assert float(intra_class_kl(zt.double(), zs.double(), y, 2.0)) == pytest.approx(
        total_intra, rel=1e-6)
    assert rows["all"]["intra"] == pytest.approx(total_intra, rel=1e-9)


def test_parts_vanish_where_they_should():
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    zt = torch.randn(6, 3, generator=g)
    # a student equal to the mentor: nothing to learn
    assert float(intra_class_kl(zt, zt, y)) == pytest.approx(0, abs=1e-6)
    assert float(inter_class_kl(zt, zt, y)) == pytest.approx(0, abs=1e-6)
    # a mentor without intra-class variation, student with it: inter can be 0, intra not
    zc = torch.stack([zt[0]] * 3 + [zt[3]] * 3)
    dec = Decomposition(3, T=4.0)
    dec.add(zc, zt, y)
    spread = {r["class"]: r["mentor_spread"] for r in dec.table()}
    assert spread["0"] == pytest.approx(0, abs=1e-9) and spread["1"] == pytest.approx(0, abs=1e-9)
    assert float(intra_class_kl(zc, zt, y)) > 0


def _mentor(tmp_path):
    r = CliRunner().invoke(cli, [
        "train-mentor", "--arch", "resnet8", "--dataset", "synthetic",
        *[f"-D{k}={v}" for k, v in TINY.items()], "--epochs", "2", "--batch-size", "16",
        "--device", "cpu", "--no-progress", "--mentor-dir", str(tmp_path / "mentors"),
        "--out", str(tmp_path / "mrun")])
    assert r.exit_code == 0, r.output
    return tmp_path / "mentors" / "synthetic" / "resnet8.pt"


def test_adapt_mentor_then_cache_and_analyze(tmp_path):
    from ckd.models import file_sha256, read_checkpoint_meta

    src = _mentor(tmp_path)
    data = ["--dataset", "synthetic", *[f"-D{k}={v}" for k, v in TINY.items()]]
    out = tmp_path / "aid.pt"
    r = CliRunner().invoke(cli, [
        "adapt-mentor", "--checkpoint", str(src), "--student", "resnet8", "--out", str(out),
        *data, "--epochs", "1", "--warmup-epochs", "1", "--batch-size", "16", "--lam", "2",
        "--margin", "100", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "adapted mentor" in r.output and "EXCEEDED" not in r.output
    meta = read_checkpoint_meta(out)
    m = meta["metrics"]
    assert meta["arch"] == "resnet8" and meta["dataset"] == "synthetic"
    assert m["adapted_from"]["sha256"] == file_sha256(src)
    assert m["adapted_from"]["checkpoint"] == str(src)
    assert m["adapted_for"] == {"student": "resnet8"} and m["objective"] == "aid-intra"
    assert m["params"]["lam"] == 2.0 and m["params"]["epochs"] == 1
    assert len(m["history"]) == 1 and m["history"][0]["intra"] >= 0
    # the adapted mentor differs from the source, and cache-logits takes it like any other
    r = CliRunner().invoke(cli, [
        "cache-logits", *data, "--mentors", f"r8={src},r8aid={out}", "--views", "2",
        "--out", str(tmp_path / "cache"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    from ckd.cache import open_cache

    c = open_cache(tmp_path / "cache", mentors=["r8", "r8aid"])
    idx = torch.arange(8)
    logits = c.gather(torch.zeros_like(idx), idx)
    assert not torch.equal(logits[0], logits[1])
    # analyze a trained student (run folder: data from its config) against both mentors
    r = CliRunner().invoke(cli, [
        "train", *data, "--student", "resnet8", "--method", "kd", "--cache",
        str(tmp_path / "cache"), "--mentors", "r8", "--epochs", "1", "--batch-size", "16",
        "--device", "cpu", "--no-progress", "--backend", "reference",
        "--out", str(tmp_path / "stu")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["analyze", "--cache", str(tmp_path / "cache"), "--mentor",
                                 "r8aid", "--student", str(tmp_path / "stu"), "--out",
                                 str(tmp_path / "an")])
    assert r.exit_code == 0, r.output
    assert "| all |" in r.output and "intra-class" in r.output
    assert (tmp_path / "an" / "analysis.png").read_bytes()[:4] == b"\x89PNG"
    csv = (tmp_path / "an" / "analysis.csv").read_text().splitlines()
    assert csv[0].startswith("class,n,kd,inter,intra") and len(csv) == 1 + 4 + 1


def test_adapt_mentor_reports_a_large_drop_loudly():
    from ckd.aid.adapt import accuracy_warning

    msg = accuracy_warning(95.0, 93.5, 1.0, "m.pt")
    assert "LOST 1.50 points" in msg and "95.00% -> 93.50%" in msg and "--margin 1.00" in msg
    assert accuracy_warning(95.0, 94.0, 1.0, "m.pt") is None  # exactly the margin: fine
    assert accuracy_warning(95.0, 96.0, 1.0, "m.pt") is None


def test_adapt_mentor_cli_fails_loudly_past_the_margin(tmp_path, monkeypatch, capfd):
    """End of a real adapt-mentor run whose mentor lost more than --margin: the banner on
    stderr names both accuracies and the fixes, the summary says EXCEEDED, the exit status
    is 3 and the checkpoint records within_margin false (the accuracies are pinned: a tiny
    run's own drop is not predictable)."""
    import ckd.aid.adapt as adapt
    from ckd.cli.aid import MARGIN_EXCEEDED_EXIT
    from ckd.models import read_checkpoint_meta

    src = _mentor(tmp_path)
    accuracies = iter([90.0, 87.5])  # the source mentor, then the adapted one
    monkeypatch.setattr(adapt, "test_accuracy", lambda *a, **k: next(accuracies))
    out = tmp_path / "aid.pt"
    capfd.readouterr()
    r = CliRunner().invoke(cli, [
        "adapt-mentor", "--checkpoint", str(src), "--student", "resnet8", "--out", str(out),
        "--dataset", "synthetic", *[f"-D{k}={v}" for k, v in TINY.items()], "--epochs", "1",
        "--warmup-epochs", "0", "--batch-size", "16", "--margin", "1", "--no-progress"])
    assert r.exit_code == MARGIN_EXCEEDED_EXIT, r.output
    assert "90.00% -> 87.50% (-2.50; margin 1.00, EXCEEDED)" in r.output
    err = capfd.readouterr().err + (r.stderr if r.stderr_bytes is not None else "")
    assert "LOST 2.50 points" in err and "lower --lam, raise --anchor" in err
    m = read_checkpoint_meta(out)["metrics"]
    assert m["within_margin"] is False and m["accuracy_drop"] == pytest.approx(2.5)
