"""Count the host syncs a piece of code would make on CUDA, on any device (CPU included).

    from s2moe_dist.testing.sync_census import SyncCensus
    with SyncCensus() as census:
        y, l_aux, _ = layer(x); (y.sum() + l_aux).backward()
    census.total      # int
    census.by_site    # {"moe/dispatcher.py:131 bincount": 2, ...}

A host sync is an op whose CUDA implementation waits for the device to finish before it returns
(the CPU needs a value the GPU computes). Counted (a ``TorchDispatchMode`` sees every aten op,
forward and backward, after autograd; the Python-level ones are wrapped while the census runs):

- ``aten._local_scalar_dense``: ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``, ``if t:``;
- ``aten.bincount``: 2 (CUDA reads the input's min and max to size the output);
- ``aten.index`` / ``aten.index_put`` with a bool (mask) index, ``aten.nonzero``,
  ``aten.masked_select``, ``aten.unique*``: the output size depends on the data;
- ``aten.repeat_interleave`` without ``output_size``: the output size is the sum of the repeats;
- ``aten.equal``: returns a Python bool;
- ``Tensor.tolist()``, ``Tensor.cpu()``, ``Tensor.numpy()``: copies to host memory.

Each sync is attributed to the innermost stack frame inside the ``s2moe_dist`` package (path
relative to it), else to the innermost frame outside torch, e.g. ``"tests/test_x.py:12 tolist"``.

``simulate_device=True`` (default) counts ops on CPU tensors as if they were on a GPU, which is
what makes the census useful on machines without one; ``False`` counts only ops on non-CPU
tensors (for a census taken on a GPU, where host-side tensors do not sync).
Not modelled: syncs inside torch kernels' own fallbacks (e.g. CUDA grouped_mm for dtypes or
architectures without a fast path copies its offsets to the host).
"""
from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from typing import Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../s2moe_dist
_REPO_DIR = os.path.dirname(_PACKAGE_DIR)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_THIS_FILE = os.path.abspath(__file__)

aten = torch.ops.aten
_SCALAR_OPS = {aten._local_scalar_dense.default: "_local_scalar_dense", aten.equal.default: "equal"}
_SIZE_OPS = {aten.nonzero.default: "nonzero", aten.masked_select.default: "masked_select",
             aten.argwhere.default: "nonzero"}
_MASK_INDEX_OPS = {aten.index.Tensor: "index(bool mask)", aten.index_put.default: "index_put(bool mask)",
                   aten.index_put_.default: "index_put(bool mask)",
                   aten._index_put_impl_.default: "index_put(bool mask)"}
_PY_METHODS = ("tolist", "cpu", "numpy")

_state = threading.local()  # depth of wrapped Python-level calls (their inner aten ops are not recounted)


def _frame_site() -> str:
    frame = sys._getframe(1)
    fallback = None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _THIS_FILE:
            if path.startswith(_PACKAGE_DIR + os.sep):
                return f"{os.path.relpath(path, _PACKAGE_DIR)}:{frame.f_lineno}"
            if fallback is None and not path.startswith(_TORCH_DIR + os.sep) and "<" not in path:
                rel = os.path.relpath(path, _REPO_DIR) if path.startswith(_REPO_DIR + os.sep) else path
                fallback = f"{rel}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback or "<unknown>"


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _unique_op_name(func) -> Optional[str]:
    name = func.overloadpacket.__name__
    return name if name.startswith(("unique", "_unique")) else None


class SyncCensus(TorchDispatchMode):
    """Context manager counting host syncs (module docstring). Nesting is allowed."""

    def __init__(self, simulate_device: bool = True):
        super().__init__()
        self.simulate_device = simulate_device
        self._counts: Counter = Counter()
        self._saved = {}

    # ---- results -----------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(self._counts.values())

    @property
    def by_site(self) -> Dict[str, int]:
        return dict(self._counts)

    def report(self) -> str:
        """One line per site, most syncs first (for assertion messages)."""
        rows = sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return "\n".join(f"  {n:3d}  {site}" for site, n in rows) or "  (none)"

    def reset(self) -> None:
        self._counts.clear()

    # ---- counting ----------------------------------------------------------------------------
    def _counts_for(self, tensors) -> bool:
        return self.simulate_device or any(t.device.type not in ("cpu", "meta") for t in tensors)

    def _add(self, op: str, n: int = 1) -> None:
        self._counts[f"{_frame_site()} {op}"] += n

    def _classify(self, func, args, kwargs):
        """(op label, syncs) for a sync-making aten call, else None."""
        if func in _SCALAR_OPS:
            return _SCALAR_OPS[func], 1
        if func is aten.bincount.default:
            return "bincount", 2
        if func in _SIZE_OPS:
            return _SIZE_OPS[func], 1
        if func in _MASK_INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices):
                return _MASK_INDEX_OPS[func], 1
            return None
        if func.overloadpacket is aten.repeat_interleave and func is not aten.repeat_interleave.self_int:
            output_size = kwargs.get("output_size", args[-1] if len(args) > 1 and isinstance(args[-1], int) else None)
            return ("repeat_interleave(no output_size)", 1) if output_size is None else None
        name = _unique_op_name(func)
        if name is not None:
            return name, 1
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not getattr(_state, "depth", 0):
            hit = self._classify(func, args, kwargs)
            if hit is not None and self._counts_for(list(_tensors(list(args) + list(kwargs.values())))):
                self._add(*hit)
        return func(*args, **kwargs)

    def _wrap(self, name):
        original = getattr(torch.Tensor, name)
        census = self

        def wrapped(t, *a, **kw):
            if getattr(_state, "depth", 0) == 0 and census._counts_for([t]) and not (
                    name == "cpu" and t.device.type == "cpu" and not census.simulate_device):
                census._add(name)
            _state.depth = getattr(_state, "depth", 0) + 1
            try:
                return original(t, *a, **kw)
            finally:
                _state.depth -= 1

        wrapped.__name__ = name
        return original, wrapped

    def __enter__(self):
        for name in _PY_METHODS:
            original, wrapped = self._wrap(name)
            self._saved[name] = original
            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, original in self._saved.items():
                setattr(torch.Tensor, name, original)
            self._saved.clear()
