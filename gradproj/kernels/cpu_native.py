"""Build and load a small C kernel library for the CPU fast paths (gcc/clang + ctypes).

PyTorch's CPU ops are one pass over memory each, and `torch.bucketize` is a scalar binary
search at ~90 ns an element (1M elements: 90 ms on one thread), so the blockwise codecs
cannot be fast as a chain of tensor ops. A small C library, compiled once per machine
with the system compiler, does a block of 256 values in L1 cache in one pass.

    lib = load("cpu_blockwise", source_text, SIGNATURES)   # ctypes.CDLL, or None

The library is compiled with `cc -O3 -march=native -ffp-contract=off -fno-math-errno`
(`-march=native` is dropped if the compiler refuses it): no `-ffast-math`, so every IEEE
operation rounds as written and NaN behaves as in PyTorch; no contraction of a·b + c into
an FMA; `-fno-math-errno` only lets `sqrtf` vectorise. It is cached under
`$GRADPROJ_CACHE_DIR` (default `$XDG_CACHE_HOME/gradproj` or `~/.cache/gradproj`; the
system temp dir if that is not writable), named by a hash of source, compiler, flags and
the CPU's feature flags (a home directory shared by machines of different CPUs must not
hand one a library built for another's instructions); concurrent processes compile to
private temp files and rename atomically. Without a working compiler `load` returns None (once per
process; the reason is in `load_error(name)`), and callers keep the PyTorch reference.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno")
NATIVE = ("-march=native",)
_LOADED: dict[str, ctypes.CDLL | None] = {}
_ERRORS: dict[str, str] = {}


def cache_dir() -> Path:
    root = os.environ.get("GRADPROJ_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gradproj"


@functools.lru_cache(maxsize=None)
def _machine() -> str:
    """The CPU's identity as far as -march=native is concerned: its feature flags."""
    fallback = f"{platform.machine()} {platform.processor()}"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("flags", "Features"):
                    return line
    except OSError:  # no /proc (not Linux): the platform's names
        return fallback
    return fallback


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compile(cc: str, source: str, out: Path, flags: tuple[str, ...]) -> str | None:
    """Compile `source` to `out` atomically; the compiler's complaint on failure, else None."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "kernels.c"
        src.write_text(source)
        lib = Path(tmp) / out.name
        try:
            proc = subprocess.run([cc, *flags, str(src), "-o", str(lib), "-lm"],
                                  capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            errors = [line for line in lines if "error" in line] or lines
            return errors[0] if errors else f"exit status {proc.returncode}"
        os.replace(lib, out)
    return None


def _build(name: str, source: str) -> Path:
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    errors = []
    user = getattr(os, "getuid", lambda: "user")()
    roots = [cache_dir(), Path(tempfile.gettempdir()) / f"gradproj-{user}"]
    for flags in (FLAGS + NATIVE, FLAGS):
        key = hashlib.sha256("\0".join((source, cc, *flags, _machine())).encode()).hexdigest()[:16]
        for root in roots:
            out = root / f"{name}-{key}.so"
            if out.exists():
                return out
            try:
                error = _compile(cc, source, out, flags)
            except OSError as exc:  # an unwritable cache: try the next place
                errors.append(f"{root}: {exc}")
                continue
            if error is None:
                return out
            errors.append(error)
            break  # the compiler refused the flags: the next flags, not the next place
    raise OSError(f"{cc} failed: {errors[-1]}")


@functools.lru_cache(maxsize=None)
def package_source(*names: str) -> str | None:
    """The text of these files next to this module (package data), one after another;
    None if one is missing (then callers keep the PyTorch reference)."""
    try:
        return "".join(Path(__file__).with_name(name).read_text() for name in names)
    except OSError:
        return None


def load(name: str, source: str, signatures: dict[str, tuple]) -> ctypes.CDLL | None:
    """The compiled library with `signatures` {function: (restype, argtypes)} set, or None.

    Tried once per process and name; a failure (no compiler, compile error, unwritable
    cache) is remembered in `load_error(name)` and returns None thereafter."""
    if name in _LOADED:
        return _LOADED[name]
    lib = None
    try:
        path = _build(name, source)
        lib = ctypes.CDLL(str(path))
        for fn, (restype, argtypes) in signatures.items():
            getattr(lib, fn).restype = restype
            getattr(lib, fn).argtypes = argtypes
    except (OSError, AttributeError) as exc:
        _ERRORS[name] = str(exc)
        lib = None
    _LOADED[name] = lib
    return lib


def load_error(name: str) -> str | None:
    """Why `load(name, ...)` returned None in this process (None when it loaded)."""
    return _ERRORS.get(name)
