"""What every fuzz test of ``tests/fuzz/`` checks, written once.

* :func:`examples` -- how many examples a property runs: a share of the loaded hypothesis
  profile (``ci``: quick, ``thorough``: ``make fuzz``), so slow properties run fewer.
* :func:`no_subprocess` -- ``subprocess.Popen``, ``os.system``, ``os.popen``, ``os.posix_spawn*``
  and ``os.exec*`` replaced by recorders that refuse; the block fails if any was called
  (even when the code under test swallowed the refusal).
* :func:`snapshot` / :func:`assert_untouched` -- inputs are never modified (bit for bit).
* :func:`expect_cmda_error` -- a call either succeeds or raises a ``CMDAError`` whose message
  starts with the argument at fault; anything else fails the test.
* :func:`assert_convex_rows`, :func:`assert_in_hull` -- weights are convex, mixes lie in the
  hull of their partners (per coordinate).

The per-property example counts of a run are collected by ``tests/conftest.py`` (it wraps
every hypothesis test under ``tests/fuzz/``) and written by ``make fuzz`` to
``benchmarks/results/fuzz.json``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from hypothesis import settings

from cmda_data.exceptions import CMDAError

__all__ = [
    "SPAWNERS",
    "assert_convex_rows",
    "assert_in_hull",
    "assert_untouched",
    "examples",
    "expect_cmda_error",
    "no_subprocess",
    "snapshot",
]


def examples(share: float = 1.0, minimum: int = 3) -> int:
    """``share`` of the loaded profile's ``max_examples`` (at least ``minimum``)."""
    return max(minimum, int(settings.default.max_examples * share))


def _imported_popens() -> Tuple[Tuple[Any, str], ...]:
    """Copies of ``Popen`` bound by ``from subprocess import Popen`` (webdataset's URL opener)."""
    try:
        gopen = importlib.import_module("webdataset.gopen")  # the module (``webdataset.gopen`` is also a function)
    except ImportError:  # the webdataset extra is optional
        return ()
    return ((gopen, "Popen"),) if hasattr(gopen, "Popen") else ()


_IMPORTED_POPENS = _imported_popens()

#: (module, attribute) of every way to start another program
SPAWNERS: Tuple[Tuple[Any, str], ...] = tuple(
    (module, name) for module, name in (
        (subprocess, "Popen"), (os, "system"), (os, "popen"), (os, "posix_spawn"), (os, "posix_spawnp"),
        (os, "execv"), (os, "execve"), (os, "execvp"), (os, "execvpe"), (os, "spawnv"), (os, "spawnve"),
    ) if hasattr(module, name)) + _IMPORTED_POPENS


class SubprocessStarted(AssertionError):
    """Raised by the recorders of :func:`no_subprocess` (not a CMDAError: it must not be swallowed)."""


@contextlib.contextmanager
def no_subprocess() -> Iterator[List[str]]:
    """Refuse (and record) every attempt to start a program inside the block; fail if there was one."""
    calls: List[str] = []
    saved = [(module, name, getattr(module, name)) for module, name in SPAWNERS]

    def recorder(label: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            calls.append(f"{label}{args[:2]!r}")
            raise SubprocessStarted(f"{label} called with {args[:2]!r}")
        return refuse

    for module, name, _ in saved:
        setattr(module, name, recorder(f"{module.__name__}.{name}"))
    try:
        yield calls
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
    assert not calls, f"a subprocess was started: {calls}"


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def snapshot(*values: Any) -> List[Tuple[Any, Any]]:
    """``(value, copy)`` of every tensor (also inside dicts, lists and tuples) for :func:`assert_untouched`."""
    out: List[Tuple[Any, Any]] = []

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if not value.is_meta:
                out.append((value, (tuple(value.shape), value.dtype, _bits(value))))
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    for value in values:
        visit(value)
    return out


def assert_untouched(saved: Iterable[Tuple[Any, Any]]) -> None:
    """Every tensor of :func:`snapshot` still has its shape, dtype and bits."""
    for tensor, (shape, dtype, bits) in saved:
        assert (tuple(tensor.shape), tensor.dtype) == (shape, dtype), "an input changed shape or dtype"
        assert _bits(tensor) == bits, f"an input {tuple(tensor.shape)} {tensor.dtype} was modified in place"


def expect_cmda_error(call: Callable[[], Any], names: Sequence[str]) -> Tuple[bool, Any]:
    """Run ``call``: ``(True, result)``, or ``(False, error)`` for a ``CMDAError`` naming one of ``names``.

    Any other exception propagates (the test fails on it); a ``CMDAError`` whose message does
    not start with one of ``names`` (the house template ``"<argument>: expected ..., got ..."``)
    fails the test.
    """
    try:
        return True, call()
    except CMDAError as error:
        message = str(error)
        assert any(message.startswith(name) or f"{name}:" in message or f"{name!r}" in message for name in names), (
            f"{type(error).__name__} does not name one of {list(names)}: {message!r}")
        assert "expected" in message, f"message without 'expected': {message!r}"
        return False, error


def assert_convex_rows(weights: torch.Tensor, *, atol: float = 1e-5) -> None:
    """Finite, non-negative rows that sum to 1."""
    w = weights.double()
    assert bool(torch.isfinite(w).all()), "non-finite weights"
    assert bool((w >= 0).all()), f"negative weight {float(w.min())}"
    sums = w.sum(-1)
    assert bool(torch.allclose(sums, torch.ones_like(sums), atol=atol)), f"row sums {sums.tolist()}"


def assert_in_hull(out: torch.Tensor, partners: torch.Tensor, *, rel: float = 1e-3,
                   index: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None) -> None:
    """Each output row lies, per coordinate, between the min and max of its partners (with a rounding margin).

    ``partners`` ``[m, *S]``; with ``index`` ``[n, k]`` (and optionally ``weights``: partners of weight 0
    are left out) row ``i``'s partners are ``partners[index[i]]``, else all ``m`` rows.
    """
    flat_out = out.double().reshape(out.shape[0], -1)
    flat = partners.double().reshape(partners.shape[0], -1)
    assert bool(torch.isfinite(flat_out).all()), "non-finite output for finite input"
    for i in range(flat_out.shape[0]):
        rows = flat if index is None else flat[index[i].long()]
        if index is not None and weights is not None:
            keep = weights[i] > 0
            rows = rows[keep] if bool(keep.any()) else rows
        low, high = rows.amin(0), rows.amax(0)
        margin = rel * torch.maximum(low.abs(), high.abs()) + 1e-30
        assert bool(((flat_out[i] >= low - margin) & (flat_out[i] <= high + margin)).all()), (
            f"row {i} leaves the hull of its partners")
