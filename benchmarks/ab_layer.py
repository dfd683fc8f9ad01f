"""A/B of the layer against an older commit, in ONE process with the steps interleaved.

    python benchmarks/ab_layer.py --base d8aabfc [--repeats 30] [--tokens 8192]
                                  [--only s2moe] [--set noise_draws=1]

Separate-process timings on a shared 2-core machine vary by +-5%, more than most single changes
win; here the base commit's ``s2moe_dist`` is extracted with ``git archive`` and imported as a
second package (``s2moe_base``; the layer code uses relative imports), both layers get the same
input, and their training steps (forward + backward, one thread) alternate, so load changes hit
both alike. Prints median CPU ms per step and new/base for S2MoE top-1 and SMoE top-2 at the paper
shape (d 256, expert hidden 512, 16 experts). ``--set`` gives the working tree's layer a config
value the base may not know (e.g. a new switch), to measure what the switch buys.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_base(rev: str, into: str):
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "s2moe_dist"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    os.rename(os.path.join(into, "s2moe_dist"), os.path.join(into, "s2moe_base"))
    sys.path.insert(0, into)
    from s2moe_base.moe.layer import S2MoELayer
    return S2MoELayer


def parse_setting(text: str):
    """"key=value" -> (key, value as int, float, bool or str)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"ab_layer.py: --set {text!r}: expected KEY=VALUE, e.g. --set noise_draws=1")
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(raw.lower(), raw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="git revision to compare the working tree with")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--only", choices=("s2moe", "smoe"), help="time one of the two layers only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="S2MoEConfig value for the working tree's layer only (int/float/bool/str)")
    args = p.parse_args(argv)
    overrides = dict(parse_setting(s) for s in args.set)
    import torch
    torch.set_num_threads(1)
    from s2moe_dist.moe.layer import S2MoELayer as New
    with tempfile.TemporaryDirectory() as tmp:
        Base = load_base(args.base, tmp)
        T, d, h, E = args.tokens, 256, 512, 16
        for moe_type, k in (("s2moe", 1), ("smoe", 2)):
            if args.only and moe_type != args.only:
                continue
            layers = {}
            for name, cls in (("base", Base), ("new", New)):
                torch.manual_seed(0)
                layers[name] = cls(d, num_experts=E, k=k, ffn_hidden_size=h, activation="gelu", moe_type=moe_type,
                                   **(overrides if name == "new" else {}))
            x, R = torch.randn(T, d, requires_grad=True), torch.randn(T, d)

            def step(layer):
                y, _, _ = layer(x)
                ((y * R).sum() + layer.aux_loss()).backward()
            for layer in layers.values():  # warm-up
                step(layer)
                step(layer)
            times = {"base": [], "new": []}
            for i in range(args.repeats):
                for name in (("base", "new") if i % 2 else ("new", "base")):
                    t0 = time.process_time()
                    step(layers[name])
                    times[name].append(time.process_time() - t0)
            b, n = statistics.median(times["base"]), statistics.median(times["new"])
            tree = "working tree" + "".join(f" {s}" for s in args.set)
            print(f"{moe_type} top-{k}, {T} tokens: base {args.base} {1000 * b:.1f} ms, {tree} {1000 * n:.1f} ms, "
                  f"new/base {n / b:.3f} (medians of {args.repeats}, CPU time, interleaved)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
