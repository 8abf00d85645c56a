"""Test-wide set-up. TRITON_INTERPRET must be set before anything imports triton, so
that the Triton kernels run (slowly, on numpy) on CPU-only machines."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
