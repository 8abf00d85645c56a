"""The one switch for the device of the kernel and view tests: CKD_TEST_DEVICE (cpu by
default: the Triton interpreter; cuda: the compiled kernels)."""

import os

import torch

DEVICE = torch.device(os.environ.get("CKD_TEST_DEVICE", "cpu"))
ON_GPU = DEVICE.type == "cuda"
