"""The training step that `ckd train --cuda-graphs` captures is capture-safe: no host sync
and no data-dependent shapes (checked on CPU with a dispatch mode), its device step
counter draws the same dgkd/TeKAP keys as the eager step's integers, its learning rate and
epoch are read from device tensors (one graph serves every epoch), the trainer wires it in
(full batches through the graph, the partial batch eager) and reaches the eager trainer's
weights, `--cuda-graphs` on a CPU is refused with the fix, and (on a GPU) the replayed
steps give the eager steps' weights bit for bit. On a GPU the comparisons run with
deterministic algorithms (`--deterministic`): without them two eager twins already differ."""

from __future__ import annotations

import copy

import pytest
import torch
from device import DEVICE, ON_GPU, gpu_deterministic
from torch.utils._python_dispatch import TorchDispatchMode

from ckd.methods import distill_loss
from ckd.models import create_model
from ckd.train.graphs import GraphedStep, make_train_step

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "item"}


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _setup(method, M=3, B=8, C=10, seed=0):
    torch.manual_seed(seed)
    model = create_model("resnet8", num_classes=C).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(B, 3, 32, 32, generator=g).to(DEVICE),
                (3 * torch.randn(M, B, C, generator=g)).half().to(DEVICE),
                torch.randint(0, C, (B,), generator=g).to(DEVICE)) for _ in range(3)]
    kw = dict(method=method, backend="triton", validate=False)
    return model, opt, batches, kw


def _loss(kw, counters):
    """The step's loss: distill_loss with these keywords and per-step counters."""
    return lambda logits, mentor, labels, stats: distill_loss(
        logits, mentor, labels, mentor_stats=stats, **kw, **counters)


def _step(model, opt, kw, counters):
    counter = counters.get("step")
    return make_train_step(model, opt, _loss(kw, counters), _no_autocast,
                           counter if isinstance(counter, torch.Tensor) else None)


def _call(step, batch):
    x, zm, y = batch
    return step(x, zm, None, y)


@pytest.mark.parametrize("method", ["classroom", "dgkd"])
def test_step_has_no_host_sync(method):
    model, opt, batches, kw = _setup(method)
    counters = {"step": torch.zeros((), dtype=torch.int64, device=DEVICE), "seed": 3} \
        if method == "dgkd" else {}
    step = _step(model, opt, kw, counters)
    _call(step, batches[0])  # first step creates the momentum buffers
    with Ops() as ops:
        out = _call(step, batches[1])
    assert not SYNC_OPS & ops.names, SYNC_OPS & ops.names
    assert set(out) >= {"loss", "logits", "nonfinite", "mentor_rank"}
    if method == "dgkd":
        assert int(counters["step"]) == 2


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


@gpu_deterministic()
def test_device_step_counter_equals_integer_steps():
    model, opt, batches, kw = _setup("dgkd")
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    counters = {"step": torch.zeros((), dtype=torch.int64, device=DEVICE), "seed": 3}
    step = _step(model, opt, kw, counters)
    for i, batch in enumerate(batches):
        _call(step, batch)
        eager = _step(twin, twin_opt, kw, {"step": i, "seed": 3})
        _call(eager, batch)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU (CKD_TEST_DEVICE=cuda)")
@gpu_deterministic()
def test_graph_replay_equals_eager_steps():
    model, opt, batches, kw = _setup("classroom")
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    graphed = GraphedStep(_step(model, opt, kw, {}), warmup=2)
    eager = _step(twin, twin_opt, kw, {})
    for x, zm, y in batches * 2:
        graphed(tuple(x.shape), x, zm, None, y)
        eager(x, zm, None, y)
    assert graphed.captures == 1 and graphed.replays == len(batches) * 2 - 2
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), (a - b).abs().max()  # bit for bit (deterministic)



# ------------------------------------------------------------------ the trainer's flag
TINY = dict(n_train=20, n_test=8, num_classes=10, seed=0)  # batches of 8, 8 and 4
TRAIN = dict(dataset="synthetic", dataset_options=TINY, student="resnet8", epochs=2,
             batch_size=8, progress=False, device="cpu", backend="triton", log_every=1,
             seed=1, schedule="step", milestones=[1])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    pytest.importorskip("zarr")  # gpu_check.sh may run where the cache packages are not
    from ckd.cache import build_cache
    from ckd.data import load_dataset
    from ckd.models import save_checkpoint

    tmp = tmp_path_factory.mktemp("graphs")
    paths = {}
    for alias, seed in (("t", 5), ("p", 6)):
        torch.manual_seed(seed)
        paths[alias] = str(tmp / f"{alias}.pt")
        save_checkpoint(paths[alias], create_model("resnet8", 10), arch="resnet8",
                        num_classes=10, dataset="synthetic", metrics={})
    return str(build_cache(load_dataset("synthetic", **TINY), paths, tmp / "cache", views=2,
                           progress=False))


def test_cuda_graphs_without_cuda_is_refused_with_the_fix(tmp_path):
    from click.testing import CliRunner

    from ckd.cli.main import main as cli
    from ckd.train import train

    with pytest.raises(ValueError, match=r"needs a CUDA device .*cpu.*drop --cuda-graphs"):
        train(dict(TRAIN, method="nokd", backend="auto", cuda_graphs=True,
                   out=str(tmp_path / "a")))
    res = CliRunner().invoke(cli, ["train", "--cuda-graphs", "--device", "cpu", "--dataset",
                                   "synthetic", "--method", "nokd", "--out",
                                   str(tmp_path / "b")])
    assert res.exit_code != 0 and "drop --cuda-graphs" in res.output, res.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("method", ["classroom", pytest.param("dgkd", marks=pytest.mark.slow),
                                    pytest.param("dkd", marks=pytest.mark.slow)])
def test_trainer_graph_mode_equals_eager_trainer(cache, tmp_path, monkeypatch, method):
    """`--cuda-graphs` wiring. On CPU the graph replay is replaced by a call of the very
    step it would capture (checked for host syncs as it runs); on a GPU it is the real
    capture and replay. Full batches go through it with one capture key for both epochs
    (the lr and epoch change on the device), the partial batch runs eagerly, and the
    weights equal the eager trainer's."""
    from ckd.train import TrainConfig, train
    from ckd.train import graphs as G

    cfg = dict(TRAIN, method=method, cache=cache, mentors=["t", "p"])
    if ON_GPU:
        cfg.update(device=str(DEVICE), amp=False, deterministic=True)
    eager = train(dict(cfg, out=str(tmp_path / "eager")))

    replays: list = []
    graph_call = G.GraphedStep.__call__

    def replay(self, key, *inputs):
        if ON_GPU:  # the real capture and replay
            replays.append((id(self), key, None))
            return graph_call(self, key, *inputs)
        with Ops() as ops:
            out = self.step(*inputs)
        replays.append((id(self), key, ops.names))
        return out

    if not ON_GPU:
        monkeypatch.setattr(TrainConfig, "_check_cuda_graphs", lambda self: None)
        monkeypatch.setattr(G, "check_capturable", lambda run: None)
    monkeypatch.setattr(G.GraphedStep, "__call__", replay)
    graphed = train(dict(cfg, cuda_graphs=True, out=str(tmp_path / "graphs")))
    assert len(replays) == 2 * 2  # two full batches per epoch, the batch of 4 eager
    assert len({(who, key) for who, key, _ in replays}) == 1  # one capture for the run
    for _, _, names in replays:
        if names is not None:
            assert not SYNC_OPS & names, SYNC_OPS & names
            assert "_fused_sgd_" in names  # the lr read from a device tensor
    assert [h["lr"] for h in graphed["history"]] == [h["lr"] for h in eager["history"]]
    assert graphed["steps"] == eager["steps"] == 6
    for (k, a), b in zip(graphed["model"].state_dict().items(),
                         eager["model"].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
