"""Where the CPU time of one S2MoE top-1 training step goes, by part of the layer, base vs working tree.

    python benchmarks/step_profile.py --base f65ce84 [--tokens 8192] [--repeats 5]

A TorchDispatchMode times every aten op (process time, one thread) and files it under the part of
the layer that issued it: forward ops by their source file in ``s2moe_dist/moe/`` (noise, router,
dispatcher, experts, gate and mix, balance loss, InfoNCE), backward ops by the autograd node that
created them (anomaly mode, without its NaN checks, records the forward stack of every node).
Both layers (the base commit's, imported as ``s2moe_base`` like ab_layer.py does, and the working
tree's) alternate, medians over the repeats. The timer adds a few microseconds per op, so parts
made of many small ops read a little high.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import sys
import tempfile
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_layer import load_base  # noqa: E402
from op_count import is_compute_op  # noqa: E402

# innermost frame in s2moe_dist/moe/ (file, function) -> part of the layer
FILE_PARTS = {"noise.py": "noise", "router.py": "router", "router_variants.py": "router",
              "dispatcher.py": "dispatch/combine", "a2a_dispatcher.py": "dispatch/combine",
              "experts.py": "experts", "mix.py": "gate+mix", "stream_balance.py": "balance loss",
              "infonce.py": "InfoNCE", "layer.py": "gate linear, stats (layer.py)"}
FRAME = re.compile(r'File "([^"]+)", line \d+, in (\w+)')


def part_of(frames) -> str:
    """frames: (filename, function) pairs, outermost first."""
    for filename, func in reversed(list(frames)):
        if os.sep + "moe" + os.sep not in filename:
            continue
        base = os.path.basename(filename)
        if base == "losses.py":  # the base commit keeps InfoNCE next to the balance loss
            return "balance loss" if func == "balance_loss" else "InfoNCE"
        if base in FILE_PARTS:
            return FILE_PARTS[base]
    return "loss / harness"


class PartTimer(TorchDispatchMode):
    """Per-part CPU ms of the aten ops run inside it. Backward ops go to the part whose forward
    created their autograd node (anomaly mode records the forward stack in the node's metadata)."""

    def __init__(self):
        super().__init__()
        self.ms = collections.Counter()
        self.ops = collections.Counter()  # aten compute ops (op_count.py's definition)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.process_time()
        out = func(*args, **(kwargs or {}))
        part = self._part()
        self.ms[part] += 1000 * (time.process_time() - t0)
        self.ops[part] += is_compute_op(func)
        return out

    @staticmethod
    def _part() -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            trace = node.metadata.get("traceback_", "")
            trace = "".join(trace) if isinstance(trace, list) else str(trace)
            return part_of(FRAME.findall(trace)) + " (backward)"
        return part_of((f.filename, f.name) for f in traceback.extract_stack())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from s2moe_dist.moe.layer import S2MoELayer as New
    with tempfile.TemporaryDirectory() as tmp:
        Base = load_base(args.base, tmp)
        layers = {}
        for name, cls in (("base", Base), ("new", New)):
            torch.manual_seed(0)
            layers[name] = cls(256, num_experts=16, k=1, ffn_hidden_size=512, activation="gelu")
        x, R = torch.randn(args.tokens, 256, requires_grad=True), torch.randn(args.tokens, 256)
        runs, ops = {"base": [], "new": []}, {}
        for i in range(args.repeats + 1):
            for name in (("base", "new") if i % 2 else ("new", "base")):
                layer = layers[name]
                layer.zero_grad(set_to_none=True)
                with torch.autograd.set_detect_anomaly(True, check_nan=False), PartTimer() as timer:
                    y, _, _ = layer(x)
                    ((y * R).sum() + layer.aux_loss()).backward()
                if i:  # the first round is a warm-up
                    runs[name].append(timer.ms)
                    ops[name] = timer.ops
    parts = sorted({k for r in runs.values() for t in r for k in t})
    med = {n: {k: statistics.median(t.get(k, 0.0) for t in r) for k in parts} for n, r in runs.items()}
    print(f"S2MoE top-1 training step, {args.tokens} tokens, CPU ms (median of {args.repeats}) and aten "
          f"compute ops, base {args.base} vs working tree")
    print("| part | base ms | new ms | base ops | new ops |\n|---|---:|---:|---:|---:|")
    for k in sorted(parts, key=lambda k: -max(med["base"][k], med["new"][k])):
        print(f"| {k} | {med['base'][k]:.1f} | {med['new'][k]:.1f} | {ops['base'][k]} | {ops['new'][k]} |")
    print(f"| total | {sum(med['base'].values()):.1f} | {sum(med['new'].values()):.1f} | "
          f"{sum(ops['base'].values())} | {sum(ops['new'].values())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
