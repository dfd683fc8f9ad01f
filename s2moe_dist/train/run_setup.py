"""What ``s2moe-train`` checks before any process group starts: the run config, the world size from
the launcher, the DeepSpeed JSON, the output folder, the resume target and the data file
(``setup``); every problem is a ``ValueError`` naming the field and the fix (exit 2)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import checkpoint as ckpt
from .config import RunConfig, check_parallel_layout, load_run_config
from .distributed import Launch, check_cuda_usable, check_local_device, resolve_launch, visible_gpus
from .ds_config import build_ds_config

CKPT_SUBDIR = "checkpoints"


@dataclass
class TrainArgs:
    config: str
    deepspeed: Optional[str] = None
    data: Optional[str] = None
    overrides: List[str] = dataclasses.field(default_factory=list)
    resume: Optional[str] = None  # None, "auto" or a checkpoint tag folder
    output: Optional[str] = None


@dataclass
class Setup:
    """Everything ``setup`` checked. ``resume_target``: the (checkpoint folder, tag) whose marker was
    checked against this run (world size, model); None for a fresh start."""
    args: TrainArgs
    run: RunConfig
    launch: Launch
    ds_config: Dict[str, Any]
    output: str
    corpus: Any
    resume_target: Optional[Tuple[str, str]] = None


def default_output(config_path: str) -> str:
    return os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])


def resolve_resume(resume: Optional[str], ckpt_dir: str):
    """(checkpoint folder, tag) to resume from, or None. ``auto``: the last complete checkpoint
    of this run's output, or None for a fresh start; a path: that tag folder."""
    if resume is None:
        return None
    if resume == "auto":
        tag = ckpt.find_resume_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    path = os.path.abspath(resume)
    if os.path.isfile(os.path.join(path, ckpt.LATEST)):  # a checkpoints folder
        tag = ckpt.find_resume_tag(path)
        if tag:
            return path, tag
    if os.path.isdir(path) and ckpt.is_complete(os.path.dirname(path), os.path.basename(path)):
        return os.path.dirname(path), os.path.basename(path)
    raise ValueError(f"--resume {resume!r}: not a complete checkpoint (a folder like "
                     f"OUTPUT/checkpoints/global_stepN holding {ckpt.COMPLETE}, or OUTPUT/checkpoints); "
                     "use --resume auto to continue this run's own checkpoints")


def check_resumable(ckpt_dir: str, tag: str, run: RunConfig, world_size: int) -> None:
    """Same world size (the data order depends on it) and the same model (ep_size may change), from
    the tag's completion marker (readable before any process group)."""
    marker = ckpt.read_marker(ckpt_dir, tag)
    saved_world = marker.get("world_size")
    if saved_world is not None and saved_world != world_size:
        raise ValueError(f"--resume: {tag} was written by {saved_world} ranks, this run has {world_size}: resume "
                         "with the same number of ranks (the data order depends on it)")
    saved = marker.get("model")
    if saved is None:
        return
    mine = run.model.to_dict()
    diffs = []
    for key in sorted(set(saved) | set(mine)):
        if key == "moe":
            from ..model.config import saved_moe_fields  # an older checkpoint: left-out fields take defaults
            a, b = saved_moe_fields(saved), dict(mine.get("moe", {}))
            a.pop("ep_size", None), b.pop("ep_size", None)  # EP size may change (re-sharded on load)
            diffs += [f"model.moe.{k}: checkpoint {a.get(k)!r}, this run {b.get(k)!r}"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif key != "vocab_size" and saved.get(key) != mine.get(key):
            diffs.append(f"model.{key}: checkpoint {saved.get(key)!r}, this run {mine.get(key)!r}")
    if diffs:
        raise ValueError(f"--resume: {os.path.join(ckpt_dir, tag)} holds another model ({'; '.join(diffs)}); "
                         "resume with the config it was trained with (its output folder has config.yaml)")


def setup(args: TrainArgs) -> Setup:
    """Validate everything; no process group, no model yet. Raises ValueError naming the field."""
    from ..data import load_corpus

    run = load_run_config(args.config, args.overrides, args.data)
    launch = resolve_launch()
    check_parallel_layout(run, launch.world_size)  # world = TP x DP, EP groups, batch over DP
    check_cuda_usable(visible_gpus(), torch.cuda.is_available(), torch.__version__, torch.version.cuda, os.environ)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        check_local_device(launch, torch.cuda.device_count())
    notes: List[str] = []
    ds_config = build_ds_config(args.deepspeed, run.train, launch.world_size // run.model.tp_size, device=device,
                                notes=notes)
    if launch.rank == 0:
        for note in notes:
            print(f"[s2moe-train] note: {note}", flush=True)
    output = os.path.abspath(args.output or default_output(args.config))
    ckpt_dir = os.path.join(output, CKPT_SUBDIR)
    complete, damaged = ckpt.complete_tags(ckpt_dir), ckpt.damaged_tags(ckpt_dir)
    if args.resume is None and complete:
        raise ValueError(f"--output {output} already holds checkpoints ({complete[-1]}): "
                         "pass --resume auto to continue that run, or choose a new --output")
    if damaged and not complete and args.resume in (None, "auto"):
        # a rerun after "no undamaged checkpoint" must not quietly restart a long run from step 0 there
        raise ValueError(f"--output {output} holds only damaged checkpoints ({', '.join(damaged)}"
                         f" in {ckpt_dir}): starting from step 0 there would silently restart the run; resume "
                         "from a checkpoint elsewhere (--resume PATH/global_stepN), move the damaged folders "
                         "out of the way to start again, or choose a new --output")
    found = resolve_resume(args.resume, ckpt_dir)
    if found is not None:
        check_resumable(*found, run, launch.world_size)
    problem = ckpt.probe_write(ckpt_dir)  # every rank writes checkpoint files
    if problem:
        raise ValueError(f"--output {output}: checkpoints cannot be written to {ckpt_dir} ({problem}); "
                         "choose a writable --output with free space")
    d = run.data
    corpus = load_corpus(d.path, kind=d.kind, split=tuple(d.split), cache_dir=d.cache_dir)
    corpus.check_seq_len(run.model.seq_len)
    if run.model.vocab_size is None:
        run.model.vocab_size = corpus.vocab_size
    elif run.model.vocab_size < corpus.vocab_size:
        raise ValueError(f"model.vocab_size={run.model.vocab_size} is invalid: the data ({corpus.kind}) has "
                         f"{corpus.vocab_size} symbols; set model.vocab_size: null to take it from the data")
    return Setup(args, run, launch, ds_config, output, corpus, resume_target=found)
