"""Run configuration: one YAML with ``model:``, ``train:`` and ``data:`` sections, plus
``--set section.field=value`` overrides. Everything is validated here, before any process
group exists; errors name the field (``train.batch_size``) and what to do."""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from ..config import check_choice, check_float, check_int, config_error, from_mapping
from ..model.config import ModelConfig, check_bool, model_config_from_dict

LR_SCHEDULES = ("cosine", "linear", "constant")


class _Loader(yaml.SafeLoader):
    """PyYAML's SafeLoader reads ``1e-3`` as a string (YAML 1.1); read it as a float (YAML 1.2)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text):
    return yaml.load(text, Loader=_Loader)
SECTIONS = ("model", "train", "data")


@dataclass
class TrainConfig:
    """The ``train:`` section. The table in docs/training.md is generated from this list.

    Attributes:
        steps: Optimizer steps of the run.
        batch_size: Global batch, in sequences of ``model.seq_len`` (all ranks together); must
            divide by the data-parallel size x ``gradient_accumulation_steps``.
        gradient_accumulation_steps: Micro-steps per optimizer step.
        lr: Peak learning rate.
        min_lr_ratio: Final learning rate = ``lr * min_lr_ratio`` (cosine / linear).
        warmup_steps: Linear warm-up steps.
        lr_schedule: ``cosine``, ``linear`` or ``constant`` after warm-up.
        weight_decay: AdamW weight decay (not applied to biases and 1-D parameters).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        eps: AdamW epsilon.
        grad_clip: Global gradient-norm clipping (DeepSpeed ``gradient_clipping``); 0: none.
        seed: Seed of weights, data order, noise and dropout.
        log_every: Steps between TensorBoard scalars / MoE statistics.
        eval_every: Steps between validations; 0: only at the end.
        eval_k: Experts per token of each validation (one ``eval/bpc_k{K}`` tag each).
        eval_windows: Held-out windows of ``seq_len`` per validation (all ranks together); 0: all.
        ckpt_every: Steps between checkpoints; 0: only at the end and on signals.
        keep_checkpoints: Newest checkpoints kept on disk; 0: keep all.
        progress: tqdm bar on rank 0 (plain lines when the output is not a terminal).
        collective_timeout_s: Seconds any collective may wait before it raises (a rank hung or
            gone) instead of hanging.
        max_consecutive_nonfinite: Skipped NaN/Inf steps in a row that stop the run (exit 3).
        allow_tf32: fp32 runs on CUDA use TensorFloat-32 tensor cores for matmuls and cuDNN
            (no effect on CPU or in bf16); false: full fp32 GEMMs.
        compile: torch.compile the model in place before training (``nn.Module.compile``: the
            state-dict keys and checkpoints stay the same). Off by default: compiling takes
            minutes on first use, which pays only on long GPU runs.
        compile_backend: torch.compile backend when ``compile`` is on (``inductor``; ``aot_eager``
            traces without code generation, for checking).
    """

    steps: int = 300
    batch_size: int = 16  # global, in sequences of model.seq_len (all ranks together)
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine / linear)
    warmup_steps: int = 20
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping (DeepSpeed "gradient_clipping")
    seed: int = 1234
    log_every: int = 10  # TensorBoard scalars and MoE statistics
    eval_every: int = 100  # 0: only at the end
    eval_k: List[int] = field(default_factory=lambda: [1, 2])
    eval_windows: int = 64  # held-out windows of seq_len per evaluation (all ranks together); 0: all
    ckpt_every: int = 100  # 0: only at the end and on signals
    keep_checkpoints: int = 2  # newest checkpoints kept on disk; 0: keep all
    progress: bool = True  # tqdm bar on rank 0
    # reliability (docs/operations.md#failures-what-happens-what-to-do): a collective waiting
    # longer than this raises (a rank hung or gone) instead of hanging; NaN/Inf steps are
    # skipped, this many in a row stop the run
    collective_timeout_s: float = 600.0
    max_consecutive_nonfinite: int = 5
    allow_tf32: bool = True  # TF32 matmuls in fp32 CUDA runs (train/precision.py)
    compile: bool = False  # torch.compile the model in place (train/compile.py)
    compile_backend: str = "inductor"

    def validate(self, model: ModelConfig) -> None:
        o = "train"
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "seed"):
            check_int(o, name, getattr(self, name), 0 if name == "seed" else 1)
        for name in ("warmup_steps", "log_every", "eval_every", "eval_windows", "ckpt_every", "keep_checkpoints"):
            check_int(o, name, getattr(self, name), 0)
        check_float(o, "lr", self.lr, strict=True)
        check_float(o, "min_lr_ratio", self.min_lr_ratio)
        if self.min_lr_ratio > 1:
            raise config_error(o, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check_choice(o, "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_float(o, "weight_decay", self.weight_decay)
        for name in ("beta1", "beta2"):
            check_float(o, name, getattr(self, name))
            if getattr(self, name) >= 1:
                raise config_error(o, name, getattr(self, name), "must be in [0, 1)")
        check_float(o, "eps", self.eps, strict=True)
        check_float(o, "grad_clip", self.grad_clip)
        check_bool(o, "progress", self.progress)
        check_bool(o, "allow_tf32", self.allow_tf32)
        check_bool(o, "compile", self.compile)
        if self.compile:
            from .compile import check_backend
            check_backend(o, self.compile_backend)
        check_float(o, "collective_timeout_s", self.collective_timeout_s, strict=True)
        if self.collective_timeout_s == float("inf"):
            raise config_error(o, "collective_timeout_s", self.collective_timeout_s,
                               "must be a finite number of seconds (default 600): a hung rank would hang all")
        check_int(o, "max_consecutive_nonfinite", self.max_consecutive_nonfinite, 1)
        if (not isinstance(self.eval_k, (list, tuple)) or not self.eval_k
                or any(isinstance(k, bool) or not isinstance(k, int) for k in self.eval_k)):
            raise config_error(o, "eval_k", self.eval_k, "must be a non-empty list of integers, e.g. [1, 2]")
        n_exp = model.moe.num_experts
        bad = [k for k in self.eval_k if not 1 <= k <= n_exp]
        if bad:
            raise config_error(o, "eval_k", self.eval_k,
                               f"each value must be in [1, model.moe.num_experts={n_exp}]; drop {bad}")

    def micro_batch_size(self, world_size: int, tp_size: int = 1) -> int:
        """Sequences per data-parallel rank per micro-step (TP ranks of one DP rank share a batch)."""
        dp = world_size // tp_size
        div = dp * self.gradient_accumulation_steps
        if self.batch_size % div:
            ranks = (f"world_size ({world_size})" if tp_size == 1 else
                     f"the data-parallel size (world_size / model.tp_size = {world_size}/{tp_size} = {dp})")
            raise config_error("train", "batch_size", self.batch_size,
                               f"must be divisible by {ranks} x "
                               f"train.gradient_accumulation_steps ({self.gradient_accumulation_steps}); "
                               f"use a multiple of {div}, e.g. {max(div, self.batch_size // div * div)}")
        return self.batch_size // div


@dataclass
class DataConfig:
    """``s2moe_dist.data.load_corpus`` arguments. ``path`` null: the built-in corpus.

    Attributes:
        path: text8 / enwik8 file (plain, ``.gz``, ``.zip``); ``None``: the built-in corpus
            (``--data`` sets it).
        kind: ``auto`` (file name with 'enwik' -> enwik8, else text8), ``text8`` or ``enwik8``.
        split: Train / valid / test fractions (or token counts).
        cache_dir: Decoded-id cache (default ``$S2MOE_CACHE_DIR`` or ``~/.cache/s2moe``).
    """
    path: Optional[str] = None
    kind: str = "auto"  # auto (file name with 'enwik' -> enwik8, else text8) | text8 | enwik8
    split: List[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])  # or token counts
    cache_dir: Optional[str] = None  # decoded-id cache (default $S2MOE_CACHE_DIR or ~/.cache/s2moe)

    def validate(self) -> None:
        o = "data"
        check_choice(o, "kind", self.kind, ("auto", "text8", "enwik8"))
        if not isinstance(self.split, (list, tuple)) or len(self.split) != 3:
            raise config_error(o, "split", self.split, "must be three numbers (train, valid, test), "
                               "e.g. [0.9, 0.05, 0.05]")
        if self.path is not None:
            if not isinstance(self.path, str) or not self.path:
                raise config_error(o, "path", self.path, "must be a file path or null (built-in corpus)")
            if not os.path.isfile(self.path):
                raise config_error(o, "path", self.path,
                                   "no such file; pass --data with an existing text8/enwik8 file "
                                   "(plain, .gz or .zip), or leave --data out for the built-in corpus")


@dataclass
class RunConfig:
    model: ModelConfig
    train: TrainConfig
    data: DataConfig

    def to_dict(self) -> Dict[str, Any]:
        return {"model": self.model.to_dict(), "train": dataclasses.asdict(self.train),
                "data": dataclasses.asdict(self.data)}


# validate_topology's arguments as run-YAML fields, for its error messages
TOPOLOGY_FIELDS = {"ffn_hidden_size": "model.moe.ffn_hidden_size", "hidden_size": "model.d_model",
                   "num_experts": "model.moe.num_experts", "tp_size": "model.tp_size",
                   "ep_size": "model.moe.ep_size"}


def check_parallel_layout(run: RunConfig, world_size: int) -> None:
    """The world must factor as TP x DP (``model.tp_size``) with the expert groups of
    ``model.moe.ep_size`` laid out in it (``parallel.topology.validate_topology``), and
    ``train.batch_size`` must split over the DP ranks. Raises ValueError naming the field; call
    before any process group exists."""
    from ..parallel.topology import validate_topology

    m = run.model
    moe = m.moe
    ep = moe.ep_size if m.moe_blocks else 1
    if m.tp_size == 1 and world_size % ep:
        raise ValueError(f"model.moe.ep_size={ep} is invalid: must divide the world size ({world_size} ranks); "
                         f"start {ep}*N ranks or set model.moe.ep_size=1")
    validate_topology(world_size, m.tp_size, ep, moe.num_experts, m.d_model, moe.ffn_hidden_size,
                      enable_expert_tensor_parallelism=moe.enable_expert_tensor_parallelism,
                      field_names=TOPOLOGY_FIELDS)
    run.train.micro_batch_size(world_size, m.tp_size)  # the global batch splits over the DP ranks


def parse_override(item: str):
    """``section.field=value`` (value parsed as YAML) -> (["section", "field"], value)."""
    if "=" not in item:
        raise ValueError(f"--set {item!r} is invalid: use KEY=VALUE with KEY like train.steps or "
                         "model.moe.num_experts")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or parts[0] not in SECTIONS or not all(parts):
        raise ValueError(f"--set {item!r} is invalid: KEY must start with one of {list(SECTIONS)} "
                         "followed by a field, e.g. train.steps=100")
    return parts, yaml_load(raw) if raw.strip() else None


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides or ():
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"--set {item!r}: {p} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def run_config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    data = dict(data or {})
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"config: unknown section(s) {unknown}; known sections are {list(SECTIONS)}")
    model = model_config_from_dict(data.get("model"))
    train = from_mapping(TrainConfig, data.get("train"), "train")
    dcfg = from_mapping(DataConfig, data.get("data"), "data")
    train.validate(model)
    dcfg.validate()
    return RunConfig(model, train, dcfg)


def load_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r}: no such file; pass a model YAML such as configs/model/tiny.yaml")
    with open(path) as f:
        data = yaml_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r}: must be a YAML mapping with model/train/data sections")
    return data


def load_run_config(path: str, overrides: Sequence[str] = (), data_path: Optional[str] = None) -> RunConfig:
    data = apply_overrides(load_yaml(path), overrides)
    if data_path is not None:
        data.setdefault("data", {})
        data["data"] = {**(data["data"] or {}), "path": data_path}
    return run_config_from_dict(data)
