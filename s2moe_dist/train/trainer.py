"""``s2moe-train``: the character LM on the DeepSpeed engine.

    setup()          everything that can fail on a bad input, before any process group: run
                     config, world size from the launcher, DeepSpeed JSON, output folder, resume
                     target, data file
    Trainer.start()  process group, model, engine, resume
    Trainer.loop()   step, log, eval, checkpoint, signals (checkpoint at the step boundary;
                     SIGTERM then exits 0)

Reliability (docs/operations.md#failures-what-happens-what-to-do): collective timeout
(``train.collective_timeout_s``), NaN/Inf steps skipped on all ranks (``nonfinite.py``),
checkpoints with a checksum manifest and fallback (``checkpoint.py``), signals handled from CLI
entry (a SIGTERM during start-up exits 0).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml

from . import checkpoint as ckpt
from . import faults
from .compile import compile_model
from .config import RunConfig, check_parallel_layout, load_run_config
from .distributed import (Launch, check_local_device, device_for, init_distributed, init_model_parallel,
                          resolve_launch)
from .distributed import check_cuda_usable, visible_gpus
from .ds_config import build_ds_config
from .evaluate import bpc
from .metrics import TRAIN_TAGS, Logger, gather_moe_stats
from .metrics import collapse_scalars
from ..moe.collapse import collapse_stats, probe_batch
from .nonfinite import NonFiniteGuard
from .precision import apply_tf32
from .signals import SignalFlags

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
    args: TrainArgs
    run: RunConfig
    launch: Launch
    ds_config: Dict[str, Any]
    output: str
    corpus: Any


def lr_at(step: int, t) -> float:
    """lr for optimizer step ``step`` (0-based): linear warmup, then cosine/linear decay to
    ``lr * min_lr_ratio`` at ``t.steps`` (or constant)."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    span = max(1, t.steps - t.warmup_steps)
    frac = min(1.0, (step - t.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if t.lr_schedule == "cosine" else 1 - frac
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * shape)


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
    """Same world size (the data order depends on it) and the same model (ep_size may change)."""
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
    return Setup(args, run, launch, ds_config, output, corpus)


class Trainer:
    def __init__(self, s: Setup, flags: Optional[SignalFlags] = None):
        self.s = s
        self.run_cfg, self.t = s.run, s.run.train
        self.ckpt_dir = os.path.join(s.output, CKPT_SUBDIR)
        self.tokens_seen = 0
        self.skipped_steps = 0  # NaN/Inf steps skipped over the whole run (kept in checkpoints)
        self.bar = None
        self.flags = flags  # installed at CLI entry: a signal during start-up is not lost
        self.exit_at_start = False

    # ---- construction -----------------------------------------------------------------------
    def start(self) -> None:
        import deepspeed
        import torch.distributed as dist

        from ..data import ShardedBatches
        from ..integrations.deepspeed import DeepSpeedS2MoE, s2moe_param_groups
        from ..model import CharLM

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if self.flags is None:
            self.flags = SignalFlags().install()
        init_distributed(self.s.launch, timeout_s=self.t.collective_timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = device_for(self.s.launch)
        t, m = self.t, self.run_cfg.model
        self.tf32 = apply_tf32(self.device, t.allow_tf32)  # CUDA only: fp32 GEMMs on tensor cores
        if faults.active():
            faults.at_start(self.rank)
        if self._exit_requested_at_start():  # before the slow part (model, engine, resume)
            return
        # TP ranks of one data-parallel rank read the same batch and draw the same noise
        layout = init_model_parallel(m.tp_size)
        self.dp_rank, self.dp_size = layout.dp_rank, layout.dp_size
        torch.manual_seed(t.seed)  # identical dense weights on every rank; experts: per global id
        model = CharLM(m, moe_layer_cls=DeepSpeedS2MoE)  # the MoE class DeepSpeed's engine must see
        self.micro = t.micro_batch_size(self.world, m.tp_size)
        groups = s2moe_param_groups(model, weight_decay=t.weight_decay)
        kwargs = {}
        if "optimizer" in self.s.ds_config:
            kwargs["model_parameters"] = groups
        else:
            kwargs["optimizer"] = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                                    weight_decay=t.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(model=model, config=self.s.ds_config, mpu=layout.mpu, **kwargs)
        self.model = self.engine.module
        self.moe_layers = self.model.moe_layers()
        if t.compile:
            compile_model(self.model, t.compile_backend)
        # per-DP-rank streams for noise / dropout / InfoNCE sampling (= per rank without TP)
        torch.manual_seed(t.seed + 1_000_003 * (self.dp_rank + 1))
        random.seed(t.seed + self.dp_rank)
        np.random.seed((t.seed + self.dp_rank) % 2 ** 32)
        self.train_batches = ShardedBatches(self.s.corpus.train, m.seq_len, self.micro, self.dp_rank, self.dp_size,
                                            t.seed, pin_memory=self.device.type == "cuda")
        self.step = 0
        self._resume()
        self.guard = NonFiniteGuard(self.model, self.engine, t.max_consecutive_nonfinite, self.rank, self.world,
                                    self.device)
        if faults.active():
            faults.install_router_bias(self.moe_layers, lambda: self.step + 1)
        if self.rank == 0:
            os.makedirs(self.s.output, exist_ok=True)
            with open(os.path.join(self.s.output, "config.yaml"), "w") as f:
                yaml.safe_dump(self.run_cfg.to_dict(), f, sort_keys=False)
            with open(os.path.join(self.s.output, "ds_config.json"), "w") as f:
                json.dump(self.s.ds_config, f, indent=2)
        self.logger = Logger(self.s.output, self.rank, purge_step=self.step + 1 if self.step else None)
        self._exit_requested_at_start()

    def _exit_requested_at_start(self) -> bool:
        """Collective. A SIGTERM that arrived during start-up: nothing was trained since the
        checkpoint we started from, so there is nothing to save; exit 0 (requeue-friendly)."""
        _, want_exit = self.flags.agreed(self.device if self.device.type == "cuda" else None)
        if want_exit and not self.exit_at_start:
            self.exit_at_start = True
            self._say(f"SIGTERM during start-up: nothing to save (step {getattr(self, 'step', 0)}), exiting; "
                      + self._restart_point())
        return self.exit_at_start

    def _restart_point(self) -> str:
        """Where a restart of this run continues, for the start-up exit message (rank 0)."""
        if getattr(self, "resumed_from", None):
            return f"nothing trained since {self.resumed_from}, which a restart resumes from"
        if self.rank != 0 or self.s.args.resume is None:
            return "a restart without --resume starts from step 0"
        try:
            cands = self._resume_candidates()
        except (OSError, ValueError):
            cands = []
        if not cands:
            return f"no checkpoint in {self.ckpt_dir} yet: a restart starts from step 0"
        return f"a restart with --resume {self.s.args.resume} resumes from {os.path.join(*cands[0])}"

    def _resume_candidates(self) -> List[Tuple[str, str]]:
        """(folder, tag) to try in order (rank 0 reads the folder)."""
        resume = self.s.args.resume
        if resume is None:
            return []
        found = resolve_resume(resume, self.ckpt_dir)
        if found is None:
            return []
        folder, tag = found
        if resume != "auto" and os.path.basename(os.path.abspath(resume)) == tag:
            return [found]  # a given tag folder: that one or nothing
        return [(folder, t) for t in ckpt.resume_candidates(folder)]

    def _verified_resume_tag(self) -> Optional[Tuple[str, str]]:
        """Collective: the first candidate whose files match their manifest (each rank checks a
        share of the sha256 sums); damaged ones are reported and renamed out of the way."""
        import torch.distributed as dist

        cands = [self._resume_candidates() if self.rank == 0 else None]
        dist.broadcast_object_list(cands, src=0)  # every rank resumes from the tag rank 0 chose
        for folder, tag in cands[0]:
            problems = [None] * self.world
            dist.all_gather_object(problems, ckpt.verify(folder, tag, checksums=True, share=(self.rank, self.world)))
            bad = "; ".join(p for p in problems if p)
            if not bad:
                return folder, tag
            if self.rank == 0:
                print(f"[s2moe-train] {ckpt.damaged_warning(folder, tag, bad)}", flush=True)
                if folder == self.ckpt_dir:
                    print(f"[s2moe-train] renamed it to {ckpt.mark_damaged(folder, tag)}", flush=True)
            dist.barrier()
        if cands[0]:
            tried = ", ".join(os.path.join(f, t) for f, t in cands[0])
            raise ValueError(f"--resume {self.s.args.resume}: no undamaged checkpoint (tried {tried}; see the "
                             "warnings above); resume from another checkpoint or start again with a new --output")
        return None

    def _resume(self) -> None:
        found = self._verified_resume_tag()
        if found is None:
            if self.s.args.resume == "auto" and self.rank == 0:
                print(f"[s2moe-train] no checkpoint in {self.ckpt_dir}: starting from step 0", flush=True)
            return
        load_dir, tag = found
        check_resumable(load_dir, tag, self.run_cfg, self.world)
        _, client = self.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        state = client["s2moe"]
        if state["world_size"] != self.world:
            raise ValueError(f"--resume: {tag} was written by {state['world_size']} ranks, this run has "
                             f"{self.world}: resume with the same number of ranks (the data order depends on it)")
        self.train_batches.load_state_dict(state["data"][self.rank])
        ckpt.set_rng_state(state["rng"][self.rank])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.resumed_from = os.path.join(load_dir, tag)
        if self.rank == 0:
            print(f"[s2moe-train] resumed from {os.path.join(load_dir, tag)} at step {self.step}", flush=True)

    # ---- pieces of the loop -----------------------------------------------------------------
    def _client_state(self) -> Dict[str, Any]:
        import torch.distributed as dist

        mine = {"data": self.train_batches.state_dict(), "rng": ckpt.rng_state()}
        every = [None] * self.world
        dist.all_gather_object(every, mine)  # client_state is written by rank 0 only
        return {"s2moe": {"step": self.step, "world_size": self.world, "tokens_seen": self.tokens_seen,
                          "skipped_steps": self.skipped_steps,
                          "config": self.run_cfg.to_dict(), "data": [e["data"] for e in every],
                          "rng": [e["rng"] for e in every]}}

    def save(self) -> str:
        tag = ckpt.save(self.engine, self.ckpt_dir, self.step, self._client_state(), self.t.keep_checkpoints,
                        self.rank, marker={"model": self.run_cfg.model.to_dict()})
        self.last_saved = self.step
        self.last_saved_tag = os.path.join(self.ckpt_dir, tag)
        self._say(f"checkpoint {os.path.join(self.ckpt_dir, tag)}")
        return tag

    def evaluate(self) -> Dict[int, float]:
        from ..data import EvalBatches

        m = self.run_cfg.model
        per_rank = max(1, self.t.eval_windows // self.dp_size) if self.t.eval_windows else None
        bs = min(self.micro, per_rank) if per_rank else self.micro
        batches = EvalBatches(self.s.corpus.valid, m.seq_len, bs, self.dp_rank, self.dp_size,
                              max_batches=-(-per_rank // bs) if per_rank else None)
        result = bpc(self.model, batches, self.t.eval_k, self.device)
        self.logger.scalars(self.step, {f"eval/bpc_k{k}": v for k, v in result.items()})
        probe = probe_batch(self.s.corpus.valid, m.seq_len, self.device)  # expert-collapse diagnostics
        self.logger.scalars(self.step, collapse_scalars(collapse_stats(self.model, self.moe_layers, probe)))
        self.logger.flush()
        self.last_eval = result
        self._say(f"step {self.step}: eval BPC " + "  ".join(f"k={k}: {v:.4f}" for k, v in result.items()))
        return result

    def _train_step(self, record: bool) -> Dict[str, torch.Tensor]:
        from ..model import lm_loss

        lr = lr_at(self.step, self.t)
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # no host sync per step
        gas = self.t.gradient_accumulation_steps
        step = self.step + 1  # the step being trained, as logged
        hooks = faults.before_step(step, self.rank, self.model) if faults.active() else []
        for micro in range(gas):
            for _, layer in self.moe_layers:  # InfoNCE accuracy costs a [N, N] product: log steps only
                layer.record_infonce_accuracy = record and micro == gas - 1
            x, y = next(self.train_batches)  # pinned on CUDA: the copies do not wait for the GPU
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            logits = self.engine(x)
            parts = lm_loss(self.model, logits, y)
            total = faults.after_forward(step, self.rank, parts.total, self.model) if faults.active() else parts.total
            self.guard.check_loss(total)
            self.engine.backward(total)
            if micro == gas - 1:  # the optimizer step: taken on all ranks or skipped on all
                seen, mine = self.flags.local()  # the signal flags ride on the guard's one all-reduce
                causes = self.guard.decide(extra=mine)
                signals = self.flags.settle(seen, self.guard.extra)
                skip = bool(causes["loss"] or causes["grad"])
                ds_skips = self.engine.skipped_steps
                with self.guard.skipping(skip):
                    self.engine.step()
                if self.engine.skipped_steps > ds_skips and not skip:  # DeepSpeed's own overflow check
                    causes["deepspeed"], skip = True, True
            else:
                self.engine.step()
            sums += torch.stack([total.detach().double()] + [p.detach().double() for p in parts[1:]])
        for h in hooks:
            h.remove()
        self.tokens_seen += self.t.batch_size * self.run_cfg.model.seq_len
        return {"loss": sums / gas, "lr": lr, "nonfinite": causes if skip else None, "signals": signals}

    def _log(self, out, step_time: float, steps_timed: int) -> Dict[str, float]:
        import torch.distributed as dist

        loss = out["loss"].to(self.device)
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        total, task, bal, unc = (float(v) for v in loss.cpu())
        norm = self.engine.get_global_grad_norm()
        tokens = steps_timed * self.t.batch_size * self.run_cfg.model.seq_len
        values = {"train/loss_total": total, "train/loss_task": task, "train/loss_balance": bal,
                  "train/loss_uncertainty": unc, "train/lr": out["lr"],
                  "train/grad_norm": float(norm) if norm is not None else float("nan"),
                  "train/tokens_per_s": tokens / max(step_time, 1e-9), "train/skipped_steps": self.skipped_steps}
        assert set(values) == set(TRAIN_TAGS)
        self.logger.scalars(self.step, values)
        self.logger.moe(self.step, gather_moe_stats(self.moe_layers, self.device))
        return values

    def _say(self, msg: str) -> None:
        if self.rank == 0:
            if self.bar is not None:
                self.bar.write(f"[s2moe-train] {msg}")
            else:
                print(f"[s2moe-train] {msg}", flush=True)

    # ---- the loop -----------------------------------------------------------------------------
    def loop(self) -> int:
        """Train to ``train.steps``; returns the process exit code (0; also after SIGTERM)."""
        from tqdm import tqdm

        t = self.t
        # a bar on a terminal; plain lines at log steps when the output goes to a file (Slurm logs)
        show = self.rank == 0 and t.progress and sys.stderr.isatty()
        self.lines = self.rank == 0 and t.progress and not show
        self.bar = tqdm(total=t.steps, initial=self.step, dynamic_ncols=True, unit="step",
                        desc="s2moe-train") if show else None
        self.last_saved = self.step if self.step else -1
        self.last_saved_tag = getattr(self, "resumed_from", None)
        self.last_eval: Dict[int, float] = {}
        timer, timed = 0.0, 0
        stopped = False
        ckpt_pending = False  # a checkpoint due at a skipped (non-finite) step waits for a good one
        while self.step < t.steps:
            log_now = t.log_every > 0 and (self.step + 1) % t.log_every == 0 or self.step + 1 == t.steps
            t0 = time.perf_counter()
            out = self._train_step(record=log_now)
            timer += time.perf_counter() - t0
            timed += 1
            self.step += 1
            skipped = out["nonfinite"]
            self.guard.record(self.step, skipped is not None)
            if skipped is not None:
                self.skipped_steps += 1
                log_now = True
                what = (f"non-finite loss on ranks {skipped['loss']}, gradients on ranks {skipped['grad']}"
                        if not skipped.get("deepspeed") else "DeepSpeed found a non-finite gradient norm")
                self._say(f"step {self.step}: {what}: step skipped on every rank ({self.guard.streak} in a row, "
                          f"stop at train.max_consecutive_nonfinite={t.max_consecutive_nonfinite})")
            if log_now:
                values = self._log(out, timer, timed)
                timer, timed = 0.0, 0
                post = {"loss": f"{values['train/loss_total']:.3f}",
                        "bpc": f"{values['train/loss_task'] / math.log(2):.3f}",
                        "tok/s": f"{values['train/tokens_per_s']:.0f}"}
                if self.bar is not None:
                    self.bar.set_postfix(post, refresh=False)
                elif self.lines:
                    self._say(f"step {self.step}/{t.steps} " + " ".join(f"{k} {v}" for k, v in post.items()))
            if self.bar is not None:
                self.bar.update(1)
            if self.guard.streak >= t.max_consecutive_nonfinite:
                self.logger.flush()
                raise self.guard.stop_error(self.step, skipped, self.last_saved_tag)
            if t.eval_every and self.step % t.eval_every == 0 or self.step == t.steps:
                self.evaluate()
            want_ckpt, want_exit = out["signals"]  # agreed over ranks in the step's flags all-reduce
            periodic = t.ckpt_every and self.step % t.ckpt_every == 0
            if ((periodic or want_ckpt or want_exit or ckpt_pending or self.step == t.steps)
                    and self.last_saved != self.step):
                ckpt_pending = self.guard.streak > 0  # never save over the last good checkpoint
                if ckpt_pending:
                    self._say(f"step {self.step}: checkpoint postponed (the step was skipped as non-finite)")
                else:
                    self.save()
            if want_exit:
                self._say(f"SIGTERM: checkpointed at step {self.step}, exiting" if self.last_saved == self.step else
                          f"SIGTERM: not checkpointing a skipped step; the last good checkpoint is "
                          f"{self.last_saved_tag}; exiting")
                stopped = True
                break
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not stopped:
            if not self.last_eval:  # resumed a finished run: still report its BPC
                self.evaluate()
            self._finish()
        self.logger.close()
        return 0

    def _finish(self) -> None:
        if self.rank != 0:
            return
        summary = {"step": self.step, "bpc_valid": {str(k): v for k, v in self.last_eval.items()},
                   "tensorboard": self.logger.tb_dir, "checkpoint": self.last_saved_tag,
                   "output": self.s.output}
        with open(os.path.join(self.s.output, "final_eval.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"[s2moe-train] done: {self.step} steps", flush=True)
        for k, v in self.last_eval.items():
            print(f"[s2moe-train] final validation BPC k={k}: {v:.4f}", flush=True)
        print(f"[s2moe-train] TensorBoard logs: {self.logger.tb_dir}", flush=True)
        print(f"[s2moe-train] checkpoint: {summary['checkpoint']}", flush=True)


def train(args: TrainArgs, flags: Optional[SignalFlags] = None) -> int:
    """``flags``: signal handlers installed by the caller (the CLI, at entry); else installed at
    start and removed at the end."""
    import torch.distributed as dist

    s = setup(args)
    trainer = Trainer(s, flags)
    try:
        trainer.start()
        code = 0 if trainer.exit_at_start else trainer.loop()
        if trainer.exit_at_start and hasattr(trainer, "logger"):
            trainer.logger.close()
    except Exception as e:
        if getattr(e, "agreed", False):  # every rank raised it at the same point: leave in order
            if hasattr(trainer, "logger"):
                trainer.logger.close()
            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()  # (exiting with live gloo threads could abort the process)
        raise
    finally:
        if flags is None and trainer.flags is not None:
            trainer.flags.uninstall()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return code
