"""Deterministic algorithms: the one switch behind `ckd train --deterministic` and
`ckd cache-logits --deterministic`.

On a GPU, bit-for-bit reproducibility (a resumed run == the uninterrupted one, a graphed
step == the eager one, two runs of one command alike) needs more than seeds: cuDNN must not
autotune or pick nondeterministic algorithms, cuBLAS needs a fixed workspace, and an op
with no deterministic kernel must stop the run instead of silently varying. `deterministic`
sets all of it for the duration of a `with` block and restores the previous state after:

- `torch.backends.cudnn.deterministic = True`, `torch.backends.cudnn.benchmark = False`;
- `torch.use_deterministic_algorithms(True)` (which also fills new uninitialized memory);
- `CUBLAS_WORKSPACE_CONFIG=:4096:8`, which cuBLAS reads when it starts: set here at import,
  before any CUDA work, and checked when the switch is turned on;
- an op without a deterministic kernel raises `DeterminismError` naming the op and the fix.

On CPU the switch changes no result (torch's CPU kernels are deterministic here) and is
still applied, so a nondeterministic op is refused the same way on every device.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

CUBLAS_KEY = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_WORKSPACE = ":4096:8"
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # the two values cuBLAS documents as deterministic

# cuBLAS reads its workspace setting once, on its first use: set it before any CUDA work
os.environ.setdefault(CUBLAS_KEY, CUBLAS_WORKSPACE)

_NO_KERNEL = re.compile(r"(?P<op>[\w.:]+) does not have a deterministic implementation")


class DeterminismError(RuntimeError):
    """--deterministic cannot be honoured: an op has no deterministic kernel, or cuBLAS
    already started with another workspace setting. The message names the fix."""


def check_cublas_workspace() -> None:
    """Set CUBLAS_WORKSPACE_CONFIG for deterministic cuBLAS; refuse when this process
    already started CUDA with another value (cuBLAS would not read the new one)."""
    import torch  # noqa: PLC0415 - the CLI imports this module before torch

    value = os.environ.get(CUBLAS_KEY)
    if value in CUBLAS_DETERMINISTIC:
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise DeterminismError(
            f"--deterministic needs {CUBLAS_KEY}={CUBLAS_WORKSPACE} before CUDA starts, but "
            f"this process already uses CUDA with {CUBLAS_KEY}={value!r}: start it with "
            f"`{CUBLAS_KEY}={CUBLAS_WORKSPACE} ckd ...` (or unset the variable), or drop "
            "--deterministic")
    os.environ[CUBLAS_KEY] = CUBLAS_WORKSPACE


def nondeterministic_op(err: BaseException | None) -> str | None:
    """The op torch names when `use_deterministic_algorithms(True)` refuses it (in `err` or
    the errors it was raised from, e.g. a model check wrapping it), else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        m = _NO_KERNEL.search(text)
        if m:
            return m.group("op")
        if "uses CuBLAS" in text and "deterministic" in text:
            return "cuBLAS"
        err = err.__cause__ or err.__context__
    return None


def refusal(op: str, what: str = "--deterministic") -> str:
    """One line naming the op and the fix."""
    if op == "cuBLAS":
        return (f"{what}: cuBLAS is not deterministic without {CUBLAS_KEY}={CUBLAS_WORKSPACE} "
                f"set before CUDA starts: start the command with `{CUBLAS_KEY}="
                f"{CUBLAS_WORKSPACE} ckd ...`, or drop {what}")
    return (f"{what}: the op {op} has no deterministic implementation on this device, so "
            f"the run cannot be bit-for-bit reproducible: drop {what}, or choose options "
            f"(model, method, device) that do not use {op}")


@contextlib.contextmanager
def deterministic(enabled: bool = True, *, warn_only: bool = False,
                  what: str = "--deterministic") -> Iterator[None]:
    """Deterministic algorithms inside the block (nothing changes when not `enabled`), the
    previous state restored after. `warn_only`: an op without a deterministic kernel warns
    instead of raising (the cache writer's default on CUDA). A refused op is re-raised as
    `DeterminismError` naming it and the fix (`what`: the option to name)."""
    if not enabled:
        yield
        return
    import torch  # noqa: PLC0415 - the CLI imports this module before torch

    check_cublas_workspace()
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    except Exception as err:
        op = None if isinstance(err, DeterminismError) else nondeterministic_op(err)
        if op is None:
            raise
        raise DeterminismError(refusal(op, what)) from err
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2:]
