"""Host syncs of the training step (the ops that wait for the device on CUDA), counted on CPU by the
sync census: per step the trainer waits for the device once (the guard's flags, read to decide
whether to take the optimizer step; the signal flags ride on the same all-reduce), and the
non-finite guard issues a few fused kernels, not ~3 per parameter. Per-step figures are the
difference between a 6-step and a 2-step run of the same trainer (start-up and the end of the run
cancel out)."""
import collections
import os
import sys
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "s2moe_dist") + os.sep
TRAINER_SIDE = ("train/", "data/")  # sites are "path/inside/s2moe_dist.py:LINE op"


def _site(op: str) -> str:
    for fr in reversed(traceback.extract_stack()[:-2]):
        if fr.filename.startswith(PKG):
            return f"{os.path.relpath(fr.filename, PKG)}:{fr.lineno} {op}"
    return f"outside {op}"


class _StandInCensus(TorchFunctionMode):
    """Used only where s2moe_dist.testing.sync_census is not in the tree: the tensor methods that
    copy a device value to the host (outermost call only)."""
    OPS = {torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.cpu: "cpu",
           torch.Tensor.__bool__: "bool", torch.Tensor.__float__: "float", torch.Tensor.__int__: "int",
           torch.Tensor.nonzero: "nonzero", torch.nonzero: "nonzero", torch.Tensor.numpy: "numpy"}

    def __init__(self):
        super().__init__()
        self.by_site = collections.Counter()
        self._depth = 0

    @property
    def total(self):
        return sum(self.by_site.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = self.OPS.get(func)
        if name is None or self._depth:
            return func(*args, **(kwargs or {}))
        self.by_site[_site(name)] += 1
        self._depth += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self._depth -= 1


def _line(site: str) -> str:
    import linecache
    path, line = site.split(" ")[0].rsplit(":", 1)
    return linecache.getline(os.path.join(PKG, path), int(line))


def census():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from gpu_parity import census_class  # the real census, where this tree has it
    real = census_class()
    return real() if real is not None else _StandInCensus()


class _OpCounter(TorchDispatchMode):
    """aten ops issued from s2moe_dist/train/nonfinite.py (the guard's kernels)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.names = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(fr.filename.endswith(os.path.join("train", "nonfinite.py")) for fr in traceback.extract_stack()[-8:]):
            self.count += 1
            self.names[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _child(steps: int, output: str, result: str) -> None:
    """In a fresh process (the trainer's process groups are per process): train under both counters."""
    import json

    from s2moe_dist.train.trainer import TrainArgs, train
    args = TrainArgs(config=os.path.join(ROOT, "configs", "model", "tiny.yaml"),
                     overrides=[f"train.steps={steps}", "train.progress=false", "train.log_every=0",
                                "train.eval_every=0", "train.ckpt_every=0", "train.eval_windows=8",
                                "train.batch_size=4", "model.n_layers=1", "model.seq_len=16"],
                     output=output)
    syncs, ops = census(), _OpCounter()
    with syncs, ops:
        assert train(args) == 0
    with open(result, "w") as f:
        json.dump({"by_site": dict(syncs.by_site), "guard_ops": ops.count, "guard_op_names": dict(ops.names)}, f)


def _run(steps, tmp_path):
    import json
    import subprocess

    from dist_utils import single_process_env
    result = tmp_path / f"counts{steps}.json"
    env = single_process_env()
    env["PYTHONPATH"] = ROOT + os.pathsep + os.path.join(ROOT, "tests") + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), str(steps), str(tmp_path / f"run{steps}"),
                        str(result)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def per_step(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("syncs")
    a, b = _run(2, tmp), _run(6, tmp)
    sites = {s: (b["by_site"].get(s, 0) - a["by_site"].get(s, 0)) / 4 for s in set(a["by_site"]) | set(b["by_site"])}
    names = {n: (b["guard_op_names"].get(n, 0) - a["guard_op_names"].get(n, 0)) / 4 for n in b["guard_op_names"]}
    print("guard aten ops per step by name:", names)
    return {s: n for s, n in sites.items() if n}, (b["guard_ops"] - a["guard_ops"]) / 4


def test_the_trainer_waits_for_the_device_once_per_step(per_step):
    sites, _ = per_step
    # the trainer's own code; DeepSpeed's engine calls (and the torch optimizer inside) are theirs
    trainer_side = {s: n for s, n in sites.items() if s.startswith(TRAINER_SIDE) and "self.engine." not in _line(s)}
    print("per-step host syncs by site:", sites)
    assert sum(trainer_side.values()) == 1, trainer_side
    (site,) = trainer_side
    assert site.startswith("train/nonfinite.py:"), trainer_side  # the guard's decision


def test_the_nonfinite_guard_issues_a_few_fused_kernels_per_step(per_step):
    _, guard_ops = per_step
    print("guard aten ops per step:", guard_ops)
    # a constant ~23 (isfinite is 4 aten ops on CPU); was ~7 per parameter (isfinite, all, not, or)
    assert guard_ops <= 25, guard_ops


if __name__ == "__main__":
    _child(int(sys.argv[1]), sys.argv[2], sys.argv[3])
