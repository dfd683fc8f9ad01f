"""Aten compute ops of one layer training step (forward + backward), by op and by source line.

    python benchmarks/op_count.py [--tokens 512] [--by-site]

On a GPU every compute op is (at least) one kernel launch; at the paper shape the expert GEMMs
take tens of microseconds there, so the launch count sets the step time. The count is taken on CPU
with a TorchDispatchMode, which sees every aten op the forward and the autograd backward run.

A *compute op* is an aten op that reads or writes tensor data: not a view (an op whose output
aliases an input without writing it: view, reshape's alias, slice, select, transpose, expand,
unsqueeze, t, as_strided, detach, alias, _unsafe_view), not a metadata query (sizes, strides,
numel, promote_types: ops that return no tensor), and not an allocation without a fill (empty,
empty_like, new_empty, empty_strided), since none of those launch a kernel on CUDA. In-place ops,
copies, fills, zero-filled allocations, reductions and device-to-host reads (_local_scalar_dense)
count.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGE = os.path.join(ROOT, "s2moe_dist") + os.sep

# allocations without a fill and metadata queries: no kernel on CUDA
_NOT_COMPUTE = {"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided",
                "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
                "_has_compatible_shallow_copy_type", "lift_fresh", "promote_types", "result_type"}


def is_compute_op(func) -> bool:
    """True for aten ops that touch tensor data (see the module docstring)."""
    if func.namespace != "aten":
        return False
    if func._schema.name.split("::")[-1] in _NOT_COMPUTE:
        return False
    if func.is_view:  # output aliases an input, nothing written
        return False
    return func.overloadpacket.__name__ not in ("detach", "alias", "_unsafe_view")  # views without the annotation


class AtenComputeOps(TorchDispatchMode):
    """Counts compute ops by op name (``by_op``) and, with ``by_site``, by the first frame inside
    ``s2moe_dist/`` that issued them (``by_site``: "moe/file.py:LINE" -> count; autograd's own
    backward ops, issued from no project frame, under "<autograd>")."""

    def __init__(self, by_site: bool = False):
        super().__init__()
        self.total = 0
        self.by_op = collections.Counter()
        self.by_site = collections.Counter()
        self._sites = by_site

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_compute_op(func):
            self.total += 1
            self.by_op[str(func.overloadpacket.__name__)] += 1
            if self._sites:
                self.by_site[_site()] += 1
        return func(*args, **(kwargs or {}))


def _site() -> str:
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(_PACKAGE):
            return f"{os.path.relpath(frame.filename, _PACKAGE)}:{frame.lineno}"
    return "<autograd>"


def paper_layer(moe_type: str, k: int, **overrides):
    """The benchmark's paper shape (d 256, expert hidden 512, 16 experts, gelu)."""
    from s2moe_dist.moe.layer import S2MoELayer
    torch.manual_seed(0)
    return S2MoELayer(256, num_experts=16, k=k, ffn_hidden_size=512, activation="gelu",
                      moe_type=moe_type, **overrides)


def count_training_step(layer, tokens: int, by_site: bool = False) -> AtenComputeOps:
    """Compute ops of one forward + backward of ``layer`` (loss: output . R + aux losses), as the
    first micro-step after ``zero_grad(set_to_none=True)`` (no accumulation into existing .grad),
    after one warm-up step (lazy state, e.g. the dispatcher, is built outside the count)."""
    x = torch.randn(tokens, layer.config.hidden_size, requires_grad=True)
    r = torch.randn(tokens, layer.config.hidden_size)

    def step():
        y, _, _ = layer(x)
        ((y * r).sum() + layer.aux_loss()).backward()
    step()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    with AtenComputeOps(by_site) as ops:
        step()
    return ops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--by-site", action="store_true", help="also count by source line")
    args = p.parse_args(argv)
    counts = {}
    for moe_type, k in (("s2moe", 1), ("smoe", 2)):
        ops = count_training_step(paper_layer(moe_type, k), args.tokens, by_site=args.by_site)
        counts[moe_type] = ops.total
        print(f"{moe_type} top-{k}: {ops.total} aten compute ops per training step "
              f"(forward + backward, {args.tokens} tokens)")
        print("  by op: " + ", ".join(f"{n} {c}" for n, c in ops.by_op.most_common()))
        if args.by_site:
            print("  by site: " + ", ".join(f"{n} {c}" for n, c in ops.by_site.most_common()))
    print(f"s2moe top-1 / smoe top-2: {counts['s2moe'] / counts['smoe']:.2f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
