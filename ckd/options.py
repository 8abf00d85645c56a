"""Declared options and boundary checks: every value a user gives (CLI flag, config key,
method parameter, dataset option) is checked once, against its declaration, before any
work starts; each error names the option, the value and what would be valid."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class OptionError(ValueError):
    """A value outside its option's declared range (a usage error)."""


@dataclass(frozen=True)
class Param:
    """A declared option (a method parameter, a config field, a dataset option).

    `low`/`high` bound numbers (`low_open`/`high_open`: strict); `choices` lists the valid
    values; `optional`: None is allowed (and means what `help` says); `cli=False` hides a
    programmatic hook (e.g. a tensor) from the CLI and configs."""

    name: str
    default: Any
    type: type
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    optional: bool = False
    cli: bool = True

    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_num(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {_num(self.high)}")
        kind = {int: "an integer", float: "a number", str: "a string",
                bool: "true or false", list: "a list",
                dict: "a mapping"}.get(self.type, self.type.__name__)
        text = kind + (" " + " and ".join(parts) if parts else "")
        return text + (" (or null)" if self.optional else "")

    def check(self, value: Any, where: str = "", label: str | None = None) -> Any:
        """The value coerced to `type`; OptionError naming the option (`label`, default the
        name), the value and the valid range."""
        if not self.cli and value is not None:
            return value  # programmatic hook (tests): passed through as is
        if value is None and (self.optional or self.default is None):
            return None
        bad = OptionError(f"{where}{label or self.name}={value!r} is invalid: must be "
                          f"{self.range_text()} ({self.help})")
        if self.type is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise bad
            return value
        if self.type in (bool, list, dict):
            if not isinstance(value, self.type):
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise bad
        if self.type is int:
            if float(value) != int(value):
                raise bad
            value = int(value)
        else:
            value = float(value)
        if self.choices and value not in self.choices:
            raise bad
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise bad
        if self.high is not None and (value > self.high
                                      or (self.high_open and value == self.high)):
            raise bad
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def option(default: Any, type_: type, help_: str, *, details: str = "",
           flags: tuple[str, ...] = (), metavar: str | None = None, **limits: Any) -> Any:
    """A config dataclass field declared once: its type, valid range and help (a `Param`,
    checked by `check_fields`), plus how the CLI spells it, from which `ckd.cli.params`
    generates the click option. `details`: more help for `--help` only (errors quote
    `help_`); `flags`: spellings other than `--field-name` (a bool's `--x/--no-x` pair, a
    short alias); `metavar`: the value's placeholder in `--help`. A list or dict default
    becomes a fresh copy per instance."""
    meta = {"option": Param("", default, type_, help_, **limits), "details": details,
            "flags": flags, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
    """The command-line spelling of a config field."""
    return "--" + name.replace("_", "-")


def field_flag(f: dataclasses.Field) -> str:
    """How the command line spells a declared field (its declared long flag, else
    `flag(name)`): what an error about the field's value names."""
    spelled = [s.split("/")[0] for s in f.metadata.get("flags") or () if s.startswith("--")]
    return spelled[0] if spelled else flag(f.name)


def declared_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass declared with `option`, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "option" in f.metadata]


def check_fields(config: Any) -> None:
    """Every declared field of `config` coerced and checked against its declaration;
    OptionError naming the field's flag, the value and the valid range."""
    for f in declared_fields(type(config)):
        value = f.metadata["option"].check(getattr(config, f.name), label=field_flag(f))
        setattr(config, f.name, value)


def default_device() -> str:
    """The device a command runs on when none is given: cuda when a GPU is visible, else
    cpu (the one place this is decided)."""
    import torch  # noqa: PLC0415 - the options stay importable without torch loaded

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None, flag: str = "--device") -> None:
    """cpu, cuda or cuda:N, and only a CUDA device that is present (None: automatic)."""
    if device is None or device == "cpu":
        return
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise OptionError(f"{flag} {device!r} is invalid: must be cpu, cuda or cuda:N")
    import torch  # noqa: PLC0415 - only when a GPU is asked for

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise OptionError(f"{flag} {device}: no CUDA GPU is visible here; use --device cpu "
                         "(or leave --device out to pick one automatically)")
    if index and int(index) >= count:
        raise OptionError(f"{flag} {device}: only {count} GPU(s) visible, valid: cuda:0.."
                         f"cuda:{count - 1}")


def check_triton_backend(backend: str, device: str | None, flag: str = "--backend") -> None:
    """The Triton kernels need a CUDA device, or TRITON_INTERPRET=1 (CPU, slow)."""
    if backend != "triton" or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if (device or default_device()).startswith("cuda"):
        return
    raise OptionError(f"{flag} triton needs a CUDA device (device here: {device or 'cpu'}): "
                     "use --backend auto or reference, or set TRITON_INTERPRET=1 to run the "
                     "kernels on the CPU (slow)")


def check_existing_dir(path: str | None, flag: str, fix: str) -> None:
    if path is not None and str(path).startswith("s3://"):
        return  # an object-store prefix: opening it checks it and names what is wrong
    if path is not None and str(path).startswith("file://"):
        path = str(path)[len("file://"):]
    if path is not None and not Path(path).is_dir():
        what = "is a file, not a folder" if Path(path).exists() else "does not exist"
        raise OptionError(f"{flag} {path}: {what} ({fix})")


def check_writable_dir(path: str | None, flag: str) -> None:
    """`path` is (or can be created as) a folder we can write: probed with a real temp file
    in its nearest existing ancestor, so read-only mounts are caught too."""
    if path is None or str(path).startswith("s3://"):
        return  # an object-store prefix: checked (bucket, credentials) when opened
    if str(path).startswith("file://"):
        path = str(path)[len("file://"):]
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OptionError(f"{flag} {path}: is a file, not a folder; choose another {flag}")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OptionError(f"{flag} {path}: {probe} is a file, so the folder cannot be "
                         f"created; choose another {flag}")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".ckd-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise OptionError(f"{flag} {path}: cannot write in {probe} ({err.strerror}); choose a "
                         f"writable {flag}") from None
