"""Caches on an object store: `s3://bucket/prefix` stores served by moto's S3 server on
loopback, talked to over real HTTP by the same client code users run (obstore through
zarr's ObjectStore, configured from the AWS_* variables): build, kill -9 and resume, the
writer lease, two training ranks reading it, and clear errors naming the URL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckd.cache import build_cache, open_cache
from ckd.cache.location import ObjectStoreError, cache_location
from ckd.data import load_dataset

sys.path.insert(0, str(Path(__file__).parent))
from test_cache_robust import cli, env, synthetic_cache_args  # noqa: E402

pytest.importorskip("obstore")


def object_tree(url: str) -> dict[str, bytes]:
    root = cache_location(url)
    return {k: root.get(k) for k in sorted(root.keys())}


def local_tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".ckd-writer.lock"}


def test_s3_cache_equals_local_and_serves_the_same_rows(s3, s3_mentors, tmp_path):
    ds = load_dataset("synthetic", n_train=64, n_test=16, num_classes=5)
    kw = dict(views=2, samples_per_chunk=16, progress=False)
    url = f"{s3}/caches/syn"
    build_cache(ds, {"r8": s3_mentors["r8"]}, url, **kw)
    local = build_cache(ds, {"r8": s3_mentors["r8"]}, tmp_path / "local", **kw)
    remote = object_tree(url)
    assert ".ckd-writer.lock" not in remote  # the writer's lease is released
    assert remote == local_tree(local)  # the same objects, byte for byte
    idx = torch.arange(64)
    for mode in ("memory", "stream"):
        with open_cache(url, mode=mode) as c, open_cache(local, mode=mode) as ref:
            c.start_epoch(1, 0)
            ref.start_epoch(1, 0)
            slots, _ = c.epoch_views(1, idx, 0)
            assert torch.equal(c.gather(slots, idx), ref.gather(slots, idx))


@pytest.mark.slow  # two CLI processes and a local reference build (~30 s on 2 cores)
def test_s3_sigkill_then_resume(s3, s3_mentors, tmp_path):
    n = 128
    url = f"{s3}/killed"
    args = synthetic_cache_args(n, f"r8={s3_mentors['r8']},r8b={s3_mentors['r8b']}", 16)
    proc = subprocess.Popen(cli(*args, "--out", url), env=env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = cache_location(url)

    def finished() -> list[str]:
        return [k for k in root.keys() if "/unit_crc32c/c/" in k]

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(finished()) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = set(finished())
    assert 3 <= len(done) < 2 * 2 * n // 16, "kill was not mid-way"
    lease = json.loads(root.get(".ckd-writer.lock"))  # the killed writer's
    assert lease["pid"] == proc.pid
    # rerun: the dead writer's lease is taken over, only the missing units are computed
    res = subprocess.run(cli(*args, "--out", url), env=env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ds = load_dataset("synthetic", n_train=n, n_test=16, num_classes=5)
    clean = build_cache(ds, {"r8": s3_mentors["r8"], "r8b": s3_mentors["r8b"]}, tmp_path / "clean",
                        views=2, samples_per_chunk=16, batch_size=16, progress=False)
    assert object_tree(url) == local_tree(clean)
    assert open_cache(url).mentors == ["r8", "r8b"]


@pytest.mark.slow  # torchrun with two processes importing torch
def test_two_ranks_build_disjoint_shards_on_s3(s3, s3_mentors, tmp_path):
    n = 64
    url = f"{s3}/sharded"
    args = synthetic_cache_args(n, f"r8={s3_mentors['r8']}", 16)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "ckd.cli.main", "cache-logits", *args,
                          "--out", url], capture_output=True, text=True, timeout=300,
                         env=env(), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    ds = load_dataset("synthetic", n_train=n, n_test=16, num_classes=5)
    one = build_cache(ds, {"r8": s3_mentors["r8"]}, tmp_path / "one", views=2,
                      samples_per_chunk=16, batch_size=16, progress=False)
    assert object_tree(url) == local_tree(one)  # the same bytes as one process


def test_s3_writer_lease_refuses_a_second_writer(s3, s3_mentors):
    from ckd.cache.lock import StoreBusyError, writer_lock

    url = f"{s3}/leased"
    ds = load_dataset("synthetic", n_train=16, n_test=8, num_classes=5)
    with writer_lock(url, "another build"):
        with pytest.raises(StoreBusyError, match=f"{url}.*another build"):
            build_cache(ds, {"r8": s3_mentors["r8"]}, url, views=1, progress=False)
    build_cache(ds, {"r8": s3_mentors["r8"]}, url, views=1, progress=False)  # released: works


def test_s3_lease_of_another_host_is_refused_until_stale(s3, s3_mentors, monkeypatch):
    from ckd.cache.lock import StoreBusyError

    url = f"{s3}/foreign"
    root, lock = cache_location(url), ".ckd-writer.lock"
    ds = load_dataset("synthetic", n_train=16, n_test=8, num_classes=5)
    lease = {"host": "other-node", "pid": 1, "command": "ckd cache-logits"}
    root.set(lock, json.dumps({**lease, "heartbeat": time.time()}).encode())
    with pytest.raises(StoreBusyError, match="pid 1 on other-node"):
        build_cache(ds, {"r8": s3_mentors["r8"]}, url, views=1, progress=False)
    monkeypatch.setenv("CKD_S3_LOCK_TTL_S", "5")  # its heartbeat is now too old: taken over
    root.set(lock, json.dumps({**lease, "heartbeat": time.time() - 60}).encode())
    build_cache(ds, {"r8": s3_mentors["r8"]}, url, views=1, progress=False)
    assert not root.exists(lock) and open_cache(url).mentors == ["r8"]


TRAIN_WORKER = """
import sys
import torch
from ckd.train import train

out, cache = sys.argv[1], sys.argv[2]
res = train(dict(dataset="synthetic", dataset_options=dict(n_train=32, n_test=16,
                 num_classes=5), student="resnet8", method="classroom", cache=cache,
                 cache_mode="stream", epochs=2, batch_size=8, device="cpu", progress=False,
                 backend="reference", log_every=1, out=out + "/run"))
torch.save({"state": res["model"].state_dict(), "world": res["world_size"]},
           f"{out}/rank{res['rank']}.pt")
"""


@pytest.mark.slow  # two torchrun processes importing torch (~40 s on 2 cores)
def test_two_ranks_train_from_s3(s3, s3_mentors, tmp_path):
    ds = load_dataset("synthetic", n_train=32, n_test=16, num_classes=5)
    url = f"{s3}/train"
    build_cache(ds, {"t": s3_mentors["r8"], "p": s3_mentors["r8b"]}, url, views=2, progress=False)
    worker = tmp_path / "worker.py"
    worker.write_text(TRAIN_WORKER)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(worker), str(tmp_path), url],
                         capture_output=True, text=True, timeout=300, env=env())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    for k, p in r0["state"].items():
        assert torch.equal(p, r1["state"][k]), k


@pytest.mark.parametrize("case", ["wrong bucket", "no credentials", "unreachable endpoint"])
def test_s3_errors_name_the_url_and_the_fix(s3, monkeypatch, case):
    url = f"{s3}/cache"
    if case == "wrong bucket":
        url, want = "s3://no-such-bucket-ckd/cache", "bucket does not exist"
    elif case == "no credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        # no instance-metadata service to fall back on (a closed loopback port)
        monkeypatch.setenv("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9")
        want = "no valid credentials.*AWS_ACCESS_KEY_ID"
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        want = "cannot reach endpoint http://127.0.0.1:9.*AWS_ENDPOINT_URL"
    with pytest.raises(ObjectStoreError, match=want) as err:
        open_cache(url)
    assert url in str(err.value)
    ds = load_dataset("synthetic", n_train=16, n_test=8, num_classes=5)
    with pytest.raises(ObjectStoreError, match=want):
        build_cache(ds, {"r8": "unused.pt"}, url, views=1, progress=False)


def test_missing_s3_cache_names_the_build_command(s3):
    with pytest.raises(FileNotFoundError, match=f"no logit cache at {s3}/none.*cache-logits"):
        open_cache(f"{s3}/none")


def _read_in_worker(url: str) -> list:
    return open_cache(url).read_checked("r8", "logits", slice(0, 1), slice(0, 16)).tolist()


def _forked_read(url: str) -> str:
    try:
        _read_in_worker(url)
    except ObjectStoreError as err:
        return str(err)
    return "no error"


def test_workers_open_their_own_reader_and_a_fork_is_refused(s3, s3_mentors):
    """A spawned worker opens the cache itself and reads it; a process forked after its
    parent used the object store (obstore's runtime does not survive fork) is refused with
    the fix instead of hanging."""
    import multiprocessing

    ds = load_dataset("synthetic", n_train=32, n_test=8, num_classes=5)
    url = f"{s3}/workers"
    build_cache(ds, {"r8": s3_mentors["r8"]}, url, views=1, samples_per_chunk=16,
                progress=False)
    want = _read_in_worker(url)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_read_in_worker, (url,)) == want
    with multiprocessing.get_context("fork").Pool(1) as pool:
        err = pool.apply_async(_forked_read, (url,)).get(timeout=60)
    assert "forked" in err and "spawn" in err and url in err
