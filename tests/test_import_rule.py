"""The import rule of docs/design.md, checked from the source (every import statement, also the
ones inside functions): ``moe`` and ``parallel`` know nothing of DeepSpeed, Megatron, models or
training; ``train`` and ``cli`` sit on top; the package never imports the tests or benchmarks,
and training code never depends on the test instruments in ``s2moe_dist.testing``. The checkpoint
package sits below ``train``; its expert key scheme (``checkpoint.keys``) is pure naming, the one
part of it ``moe`` and ``parallel`` may use.

A failure names every offending ``file:line`` and the rule it breaks."""
from __future__ import annotations

import ast
import pathlib
from typing import Iterator, List, NamedTuple, Tuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "s2moe_dist"
TEST_MODULES = {p.stem for p in (ROOT / "tests").glob("*.py")}



class Rule(NamedTuple):
    """``areas`` (sub-packages or dotted modules of s2moe_dist the rule is about) must not import
    ``banned`` (dotted prefixes: "s2moe_dist.train" also covers "s2moe_dist.train.trainer";
    "deepspeed" covers "deepspeed.comm"), except the modules under an ``allowed`` prefix."""
    areas: Tuple[str, ...]
    banned: Tuple[str, ...]
    why: str
    allowed: Tuple[str, ...] = ()


RULES: List[Rule] = [
    Rule(("moe", "parallel"),
         ("s2moe_dist.train", "s2moe_dist.cli", "s2moe_dist.data", "s2moe_dist.model", "s2moe_dist.integrations",
          "deepspeed", "megatron"),
         "moe and parallel know nothing of DeepSpeed, Megatron, models or training"),
    Rule(("moe", "parallel"), ("s2moe_dist.checkpoint",),
         "moe and parallel use only the expert key scheme of the checkpoint package (checkpoint.keys)",
         allowed=("s2moe_dist.checkpoint.keys",)),
    Rule(("checkpoint.keys",), ("s2moe_dist", "torch", "deepspeed", "megatron"),
         "the expert key scheme is pure naming (moe imports it): no torch, DeepSpeed or package imports"),
    Rule(("checkpoint.__init__",), ("s2moe_dist", "torch", "deepspeed", "megatron"),
         "importing checkpoint.keys runs the package __init__: it imports nothing"),
    Rule(("integrations", "model", "data", "config", "deepspeed_args", "_lazy", "__init__", "checkpoint"),
         ("s2moe_dist.train", "s2moe_dist.cli"),
         "train and cli sit on top: nothing below them imports them"),
    Rule(("train",), ("s2moe_dist.cli",), "cli sits on top of train"),
    Rule(("moe", "parallel", "integrations", "model", "data", "train", "cli", "config", "deepspeed_args", "_lazy",
          "__init__", "checkpoint"),
         ("s2moe_dist.testing",),
         "training code never depends on the test instruments (s2moe_dist.testing)"),
    Rule(("model", "data", "config", "deepspeed_args", "_lazy", "__init__"),
         ("deepspeed", "megatron"),
         "DeepSpeed and Megatron are imported where they are used (integrations, checkpoint, train, cli)"),
    Rule(("moe", "parallel", "integrations", "model", "data", "train", "cli", "config", "deepspeed_args", "_lazy",
          "__init__", "testing", "checkpoint"),
         ("tests", "benchmarks") + tuple(sorted(TEST_MODULES)),
         "the package never imports the tests or the benchmarks"),
]


def _module_parts(path: pathlib.Path) -> List[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports_of(source: str, path: pathlib.Path) -> Iterator[Tuple[int, str]]:
    """(line, absolute dotted module name) for every import in ``source`` (a file at ``path``)."""
    parts = _module_parts(path)
    package = parts if path.name == "__init__.py" else parts[:-1]
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, node.module
                continue
            base = package[:len(package) - (node.level - 1)]
            if node.module:
                yield node.lineno, ".".join(base + [node.module])
            else:  # "from .. import train": each name may be a sub-module
                for alias in node.names:
                    yield node.lineno, ".".join(base + [alias.name])


def _area(path: pathlib.Path) -> str:
    """The sub-package (or top-level module) of s2moe_dist that ``path`` belongs to."""
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    return rel[0]


def _dotted(path: pathlib.Path) -> str:
    """``path`` as a dotted module inside s2moe_dist ("checkpoint.keys", "moe.layer", "__init__")."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(source: str, path: pathlib.Path) -> List[str]:
    dotted = _dotted(path)
    found = []
    for line, module in imports_of(source, path):
        for rule in RULES:
            if (any(_matches(dotted, a) for a in rule.areas) and any(_matches(module, b) for b in rule.banned)
                    and not any(_matches(module, a) for a in rule.allowed)):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}: {rule.why}")
    return found


def test_every_module_follows_the_import_rule():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30, f"only {len(files)} modules found under {PACKAGE}"
    areas = {_area(f) for f in files}
    known = {a for rule in RULES for a in rule.areas}
    assert areas <= known, f"sub-packages no rule covers (add them to RULES): {sorted(areas - known)}"
    found = [v for f in files for v in violations(f.read_text(), f)]
    assert not found, "import rule broken:\n" + "\n".join(found)


def test_the_checker_names_file_and_line_of_a_breach():
    """The checker itself: an import inside a function, a relative one and an absolute one, each
    reported with its line; an allowed import is not."""
    source = ("import torch\n"
              "from ..parallel import groups\n"
              "def f():\n"
              "    from ..train.distributed import free_port\n"
              "import deepspeed.comm\n"
              "from .. import model\n")
    found = sorted(violations(source, PACKAGE / "moe" / "fake.py"))
    assert found == [
        "s2moe_dist/moe/fake.py:4 imports s2moe_dist.train.distributed: "
        "moe and parallel know nothing of DeepSpeed, Megatron, models or training",
        "s2moe_dist/moe/fake.py:5 imports deepspeed.comm: "
        "moe and parallel know nothing of DeepSpeed, Megatron, models or training",
        "s2moe_dist/moe/fake.py:6 imports s2moe_dist.model: "
        "moe and parallel know nothing of DeepSpeed, Megatron, models or training",
    ], found
    assert violations("from tests.dist_utils import run_distributed\n", PACKAGE / "train" / "fake.py") == [
        "s2moe_dist/train/fake.py:1 imports tests.dist_utils: the package never imports the tests or the benchmarks"]
    assert violations("from ..testing.sync_census import SyncCensus\n", PACKAGE / "train" / "fake.py")
    assert violations("from ..train.distributed import free_port\n", PACKAGE / "testing" / "fake.py") == []


def test_the_checkpoint_package_rules():
    """moe may use the key scheme and nothing else of the checkpoint package; the key module imports
    neither torch nor the package; the checkpoint package does not import train."""
    fake_moe = PACKAGE / "moe" / "fake.py"
    assert violations("from ..checkpoint.keys import parse_expert_key\n", fake_moe) == []
    assert violations("from ..checkpoint.live import load_checkpoint\n", fake_moe) == [
        "s2moe_dist/moe/fake.py:1 imports s2moe_dist.checkpoint.live: moe and parallel use only the expert key "
        "scheme of the checkpoint package (checkpoint.keys)"]
    keys = PACKAGE / "checkpoint" / "keys.py"
    assert violations("import re\nimport torch.distributed\nfrom ..moe import layer\n", keys) == [
        "s2moe_dist/checkpoint/keys.py:2 imports torch.distributed: the expert key scheme is pure naming "
        "(moe imports it): no torch, DeepSpeed or package imports",
        "s2moe_dist/checkpoint/keys.py:3 imports s2moe_dist.moe: the expert key scheme is pure naming "
        "(moe imports it): no torch, DeepSpeed or package imports"]
    assert violations("import torch\n", PACKAGE / "checkpoint" / "__init__.py") == [
        "s2moe_dist/checkpoint/__init__.py:1 imports torch: importing checkpoint.keys runs the package __init__: "
        "it imports nothing"]
    assert violations("import torch\nfrom ..moe import tp_shards\n", PACKAGE / "checkpoint" / "live.py") == []
    assert violations("from ..train import faults\n", PACKAGE / "checkpoint" / "live.py") == [
        "s2moe_dist/checkpoint/live.py:1 imports s2moe_dist.train: train and cli sit on top: nothing below "
        "them imports them"]
