"""The one switch for the device of the kernel and view tests: CKD_TEST_DEVICE (cpu by
default: the Triton interpreter; cuda: the compiled kernels).

`gpu_deterministic()`: the block runs with deterministic algorithms on a GPU (what
`--deterministic` sets), so tests that compare two runs bit for bit compare deterministic
ones; on CPU it changes nothing. conftest.py sets CUBLAS_WORKSPACE_CONFIG before any test
starts CUDA."""

import os

import torch

DEVICE = torch.device(os.environ.get("CKD_TEST_DEVICE", "cpu"))
ON_GPU = DEVICE.type == "cuda"


def gpu_deterministic():
    """`with gpu_deterministic():` deterministic algorithms on a GPU, the previous state
    restored after; a no-op on CPU."""
    from ckd.determinism import deterministic

    return deterministic(ON_GPU)
