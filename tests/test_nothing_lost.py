"""Nothing lost, nothing silently wrong on the newer surfaces: each test runs the command a
user would type and checks the refusal (its message naming the fix) and that the store,
file or folder it must not touch is unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckd.cli.main import main as cli
from ckd.models import create_model, save_checkpoint

SYN = ["--dataset", "synthetic", "-D", "n_train=32", "-D", "n_test=16", "-D",
       "num_classes=10"]


def run(*args: str, ok: bool = True):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    else:
        assert res.exit_code != 0, res.output
        assert "Traceback" not in res.output
    return res


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of the file itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def checkpoint(path: Path, arch: str = "resnet8", seed: int = 0, **arch_kwargs) -> Path:
    torch.manual_seed(seed)
    model = create_model(arch, 10, **arch_kwargs)
    return save_checkpoint(path, model, arch=arch, num_classes=10, dataset="synthetic",
                           metrics={}, arch_kwargs=arch_kwargs)


# ------------------------------------------------------------------ 1: mentor features
@pytest.fixture(scope="module")
def narrow_vit(tmp_path_factory) -> Path:
    """A `ckd train --student vit_tiny --student-kwargs dim=48` run folder."""
    out = tmp_path_factory.mktemp("runs") / "vit48"
    run("train", *SYN, "--student", "vit_tiny", "--student-kwargs", "dim=48", "--method",
        "nokd", "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--no-progress",
        "--out", out)
    return out


def test_features_of_a_mentor_built_with_kwargs_take_its_real_shapes(narrow_vit, tmp_path):
    r8 = checkpoint(tmp_path / "r8.pt")
    cache = tmp_path / "cache"
    args = ["cache-logits", *SYN, "--views", "2", "--device", "cpu", "--quiet", "--out", cache]
    run(*args, "--mentors", f"r8={r8}")
    res = run(*args, "--mentors", f"r8={r8},v={narrow_vit}", "--features", "pool")
    assert "v (vit_tiny) features pool 48" in res.output
    from ckd.cache import open_cache

    assert open_cache(cache, features=("pool",)).feature_shapes == {"pool": [(64,), (48,)]}
    # the feature methods build their modules from the cached (real) widths
    for method in ("crd", "fitnet"):
        run("train", *SYN, "--cache", cache, "--mentors", "v,r8", "--method", method,
            "--student", "resnet8", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
            "--backend", "reference", "--no-progress", "--out", tmp_path / method)


def test_a_refused_addition_leaves_a_complete_cache_as_it_was(narrow_vit, tmp_path):
    r8, other = checkpoint(tmp_path / "r8.pt"), checkpoint(tmp_path / "r8b.pt", seed=1)
    cache = tmp_path / "cache"
    args = ["cache-logits", *SYN, "--views", "2", "--device", "cpu", "--quiet", "--out", cache]
    run(*args, "--mentors", f"r8={r8}")
    before = digest(cache)
    # a new mentor and features for r8, then r8's checkpoint found changed: nothing written
    res = run(*args, "--mentors", f"v={narrow_vit},r8={other}", "--features", "pool", ok=False)
    assert "pass --overwrite to recompute it" in res.output
    assert digest(cache) == before
    run(*args, "--mentors", f"r8={r8}")  # still complete: nothing to do, nothing changes
    assert digest(cache) == before


# ------------------------------------------------------------------ 2, 6, 7: AID commands
def adapt_args(src: Path, out: Path) -> list:
    return ["adapt-mentor", "--checkpoint", src, "--student", "resnet8", "--out", out, *SYN,
            "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "16", "--no-progress"]


def test_adapt_mentor_never_replaces_a_file_silently(tmp_path):
    src, other = checkpoint(tmp_path / "r8.pt"), checkpoint(tmp_path / "other.pt", seed=1)
    before = digest(other)
    res = run(*adapt_args(src, other), ok=False)
    assert f"--out {other} already exists" in res.output and "--overwrite" in res.output
    assert digest(other) == before
    run(*adapt_args(src, other), "--margin", "100", "--overwrite")
    assert digest(other) != before


@pytest.mark.parametrize(("flag", "value"), [("--lam", "nan"), ("--tau", "inf"),
                                             ("--lr", "nan"), ("--margin", "nan"),
                                             ("--student-lr", "-inf"), ("--anchor", "inf"),
                                             ("--tau", "0"), ("--lr", "-1")])
def test_adapt_mentor_refuses_a_value_that_trains_garbage(tmp_path, flag, value):
    src, out = checkpoint(tmp_path / "r8.pt"), tmp_path / "aid.pt"
    res = run(*adapt_args(src, out), "--margin", "100", flag, value, ok=False)
    if value in ("nan", "inf", "-inf"):  # every float option refuses these as it is parsed
        assert f"Invalid value for '{flag}': {value} is invalid: must be a finite number" \
            in res.output
    else:  # adapt-mentor's own range checks
        assert f"{flag} {value}" in res.output and "invalid" in res.output
    assert not out.exists()


@pytest.mark.parametrize("tau", ["0", "-4", "nan", "inf"])
def test_analyze_refuses_a_temperature_that_is_not_positive(tmp_path, tau):
    res = run("analyze", "--cache", tmp_path / "cache", "--mentor", "r8", "--student",
              tmp_path / "run", "--out", tmp_path / "an", "--tau", tau, ok=False)
    if tau in ("nan", "inf"):  # every float option refuses these as it is parsed
        assert f"Invalid value for '--tau': {tau} is invalid: must be a finite number" \
            in res.output
    else:
        assert f"--tau {float(tau):g} is invalid" in res.output and "positive" in res.output
    assert not (tmp_path / "an").exists()


# ------------------------------------------------------------------ 10, 12: cache commands
def test_a_mentor_given_two_storage_modes_is_refused(tmp_path):
    r8 = checkpoint(tmp_path / "r8.pt")
    res = run("cache-logits", *SYN, "--mentors", f"r8={r8}", "--out", tmp_path / "cache",
              "--logits", "r8=topk:2,r8=dense", "--device", "cpu", ok=False)
    assert "sets mentor(s) r8 more than once: give each mentor one mode" in res.output
    assert not (tmp_path / "cache").exists()


def test_a_cache_is_never_copied_into_itself(tmp_path):
    r8 = checkpoint(tmp_path / "r8.pt")
    src = tmp_path / "cache"
    build = ["cache-logits", *SYN, "--mentors", f"r8={r8}", "--out", src, "--views", "2",
             "--device", "cpu", "--quiet"]
    run(*build)
    before = digest(src)
    res = run("cache", "copy", src, src / "inner", ok=False)
    assert "is inside" in res.output and "choose a DST outside SRC" in res.output
    assert digest(src) == before
    res = run("cache", "copy", src / "mentors", src, ok=False)  # nor SRC's folder into SRC
    assert "is inside" in res.output and digest(src) == before
    run(*build)  # the store is still taken as it was
    assert digest(src) == before


# ------------------------------------------------------------------ 5, 11: run folders
def train_args(out: Path, student: str, *extra: str) -> list:
    return ["train", *SYN, "--student", student, "--method", "nokd", "--epochs", "1",
            "--batch-size", "16", "--device", "cpu", "--backend", "reference",
            "--no-progress", "--out", out, *extra]


def test_one_student_and_several_never_share_a_run_folder(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    run(*train_args(single, "resnet8"))
    run(*train_args(multi, "resnet8,resnet14"))
    kept = {p: digest(p) for p in (single, multi)}
    for extra in ((), ("--resume",)):  # several students into one student's run
        res = run(*train_args(single, "resnet8,resnet14", *extra), ok=False)
        assert f"{single} holds one student's run" in res.output and "new --out" in res.output
        # one student into a folder of several students' runs
        res = run(*train_args(multi, "resnet8", *extra), ok=False)
        assert "holds the runs of several students (resnet14, resnet8)" in res.output
        assert f"--student resnet14,resnet8 --out {multi} --resume" in res.output
    assert {p: digest(p) for p in kept} == kept
    run(*train_args(multi, "resnet8,resnet14", "--resume", "--epochs", "2",
                    "--resume-allow", "epochs"))  # the folder's own shape resumes
    run(*train_args(single, "resnet8,resnet14", "--overwrite"))  # replaced when asked
    assert not (single / "checkpoint.pt").exists()
    assert (single / "resnet14" / "student.pt").is_file()


# ------------------------------------------------------------------ 4, 8, 9: image folders
def prepare_args(data: Path, out: Path) -> list:
    return ["prepare", "imagefolder", "--data-dir", data, "--out", out, "--max-side", "64",
            "--workers", "1"]


@pytest.fixture()
def folder(image_folder, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(image_folder, tmp_path / "images", symlinks=True))


def test_a_directory_link_loop_is_refused_by_name(folder, tmp_path):
    (folder / "train" / "class0" / "loop").symlink_to("..")
    res = run(*prepare_args(folder, tmp_path / "out"), ok=False)
    assert "train/class0/loop" in res.output and "form a loop" in res.output
    assert not (tmp_path / "out").exists()
    (folder / "train" / "class0" / "loop").unlink()  # into another class: refused too
    (folder / "train" / "class0" / "other").symlink_to(folder / "train" / "class1")
    res = run(*prepare_args(folder, tmp_path / "out"), ok=False)
    assert "train/class0/other" in res.output and "another class's images" in res.output


def test_a_link_to_a_folder_outside_the_tree_is_followed(folder, tmp_path):
    import shutil

    from ckd.data.imagefolder import scan_folder

    outside = tmp_path / "more"
    shutil.copytree(folder / "train" / "class2", outside)
    (folder / "train" / "class2" / "more").symlink_to(outside)
    rows = scan_folder(folder).files["train"]
    assert sum(1 for rel, label in rows if label == 2) == 12
    assert ("train/class2/more/img0.jpg", 2) in rows


def test_an_empty_or_unreadable_class_is_refused_by_name(folder, tmp_path):
    (folder / "train" / "class3").mkdir()
    res = run(*prepare_args(folder, tmp_path / "out"), ok=False)
    assert "class folder(s) class3 hold no image files" in res.output
    (folder / "train" / "class3" / "a.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "train" / "class3" / "b.png").write_bytes(b"not a png")
    res = run(*prepare_args(folder, tmp_path / "out"), ok=False)
    assert "class(es) class3: none of their training images could be read" in res.output
    assert "train/class3/a.jpg" in (tmp_path / "out" / "skipped.txt").read_text()
    assert not (tmp_path / "out" / "meta.json").exists()


def test_resume_on_a_finished_folder_from_other_data_is_refused(folder, image_folder,
                                                                 tmp_path):
    out = tmp_path / "out"
    run(*prepare_args(image_folder, out))
    before = digest(out)
    (folder / "train" / "class1" / "img0.jpg").unlink()  # other data, other folder
    res = run(*prepare_args(folder, out), "--resume", ok=False)
    assert f"--data-dir {image_folder.resolve()} (now {folder.resolve()})" in res.output
    assert "wrote" not in res.output and digest(out) == before
    res = run(*prepare_args(image_folder, out), "--resume")  # its own inputs: kept
    assert digest(out) == before


# ------------------------------------------------------------------ 3: verify sparse rows
def test_verify_recomputes_the_rows_of_sparse_mentors(tmp_path, monkeypatch):
    ck = {a: checkpoint(tmp_path / f"{a}.pt", seed=s) for s, a in enumerate(("d", "t", "s"))}
    cache = tmp_path / "cache"
    run("cache-logits", *SYN, "--mentors", ",".join(f"{a}={p}" for a, p in ck.items()),
        "--logits", "t=topk:3,s=sample:4", "--out", cache, "--views", "2", "--device", "cpu",
        "--quiet")
    res = run("cache", "verify", cache, "--recompute", "8")
    assert "rows recomputed: 24" in res.output and f"{cache}: OK" in res.output
    # mentors that no longer give the stored rows (as a damaged build would) are named
    import ckd.cache.recompute as recompute

    real = recompute.load_mentor
    monkeypatch.setattr(recompute, "load_mentor",
                        lambda alias, path, *a: real(alias, ck["d"], *a))
    res = run("cache", "verify", cache, "--recompute", "8", ok=False)
    for name in ("t/topk_logits", "t/topk_rest", "t/stats", "s/sample_logits", "s/stats"):
        assert f"PROBLEM {name}: " in res.output and "recomputed rows differ" in res.output
    assert "PROBLEM d/" not in res.output and "cannot read" not in res.output
