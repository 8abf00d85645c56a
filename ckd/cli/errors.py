"""The one place where an exception reaches the user: each error class ckd raises maps to
one line (`Error: ...`, exit code 1); anything else is a bug and keeps its traceback.

ckd's own errors carry a message that names the value or file and the fix, so they are
shown as they are. Errors raised inside torch, numpy or zarr on a user's input (a custom
student, a checkpoint) are shown by class and first line, with the way to the traceback.
"""

from __future__ import annotations

# ckd raises these with a message naming the problem and the fix: shown as they are.
# FloatingPointError: non-finite training or mentor values (and kernels.NonFiniteError);
# OverflowError: a mentor's logits beyond fp16; ImportError: a missing optional dependency
# (named, with its install command).
OWN_MESSAGE = (ValueError, OSError, FloatingPointError, OverflowError, ImportError)
# raised by ckd on a user's input too, but also from inside libraries: class and first line
FOREIGN = (TypeError, LookupError, RuntimeError, ArithmeticError)


def error_line(err: BaseException, command: str | None) -> str | None:
    """The one line a user sees for `err`, or None when it is not a usage error (a bug:
    the traceback is shown)."""
    from ckd.determinism import DeterminismError  # noqa: PLC0415 - a light module
    from ckd.locks import LockedError  # noqa: PLC0415 - a light module

    if isinstance(err, (*OWN_MESSAGE, LockedError, DeterminismError)):
        return str(err)
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str) \
            and " " in err.args[0]:
        return err.args[0]  # ckd's own KeyError sentences (str() would quote them)
    if isinstance(err, FOREIGN):
        lines = str(err).strip().splitlines() or [""]
        more = " ..." if len(lines) > 1 else ""
        return (f"{type(err).__name__}: {lines[0]}{more} (run `ckd --debug {command or ''} "
                "...` for the traceback)")
    return None
