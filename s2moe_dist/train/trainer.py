"""``s2moe-train``: the character LM on the DeepSpeed engine.

    setup()          everything that can fail on a bad input, before any process group
                     (``run_setup.py``): run config, world size, DeepSpeed JSON, output, resume, data
    Trainer.start()  process group, model, engine, resume
    Trainer.loop()   train a step, count a skipped one, log, validate, checkpoint, act on SIGTERM

The loop's decisions (lr, log / eval steps, whether to checkpoint) are pure functions in
``loop_policy.py``; the state the loop advances and a checkpoint holds is ``state.py``; injected
faults (tests only) all go through one ``faults.FaultInjector``.

Reliability (docs/operations.md#failures-what-happens-what-to-do): collective timeout
(``train.collective_timeout_s``), NaN/Inf steps skipped on all ranks (``nonfinite.py``),
checkpoints with a checksum manifest and fallback (``checkpoint.py``), signals handled from CLI
entry (a SIGTERM during start-up exits 0).

``TrainArgs``, ``Setup``, ``setup``, ``resolve_resume``, ``check_resumable``, ``default_output`` and
``CKPT_SUBDIR`` (``run_setup.py``) and ``lr_at`` (``loop_policy.py``) are re-exported here, where
they were defined before.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml

from . import checkpoint as ckpt
from .compile import compile_model
from .distributed import device_for, init_distributed, init_model_parallel
from .evaluate import bpc
from .faults import FaultInjector
from .loop_policy import CheckpointAction, CheckpointDecision, checkpoint_decision, is_eval_step, is_log_step, lr_at
from .loop_progress import Progress
from .metrics import TRAIN_TAGS, Logger, collapse_scalars, gather_moe_stats
from ..moe.collapse import collapse_stats, probe_batch
from .nonfinite import NonFiniteGuard
from .precision import apply_tf32
from .run_setup import CKPT_SUBDIR, Setup, TrainArgs, check_resumable, default_output, resolve_resume, setup
from .signals import AgreedSignals, SignalFlags
from .state import ResumeState, TrainState

__all__ = ["CKPT_SUBDIR", "Setup", "StepResult", "TrainArgs", "Trainer", "check_resumable", "default_output",
           "lr_at", "resolve_resume", "setup", "train"]


@dataclass
class StepResult:
    """One optimizer step. ``loss``: [total, task, balance, uncertainty], means over the
    micro-batches, float64 on the device (read only at log steps: no host sync per step);
    ``nonfinite``: None when the step was taken, else why it was skipped on every rank
    (``{"loss": ranks, "grad": ranks}``, ``"deepspeed": True`` for DeepSpeed's own overflow check);
    ``signals``: the signal flags agreed in the step's all-reduce."""
    loss: torch.Tensor
    lr: float
    nonfinite: Optional[Dict[str, Any]]
    signals: AgreedSignals

    def __getitem__(self, key: str):
        """``result["loss"]``: the mapping access of the dict this step returned before."""
        return getattr(self, key)


class Trainer:
    def __init__(self, setup: Setup, flags: Optional[SignalFlags] = None):
        self.setup = setup
        self.run_config = setup.run
        self.train_config = setup.run.train
        self.ckpt_dir = os.path.join(setup.output, CKPT_SUBDIR)
        self.flags = flags  # installed at CLI entry: a signal during start-up is not lost
        self.faults = FaultInjector.from_env(setup.launch.rank)  # no-ops unless S2MOE_FAULTS is set
        self.state = TrainState()  # step, tokens seen, skipped steps: what a checkpoint resumes
        # process and layout (start(); the launcher's values until the process group is up)
        self.rank, self.world = setup.launch.rank, setup.launch.world_size
        self.dp_rank, self.dp_size = 0, 1
        self.device = torch.device("cpu")
        self.tf32 = False
        self.micro_batch = 0  # sequences per rank and micro-step
        # built by start()
        self.engine = None
        self.model: Optional[torch.nn.Module] = None
        self.moe_layers: List[Tuple[int, Any]] = []
        self.train_batches = None
        self.guard: Optional[NonFiniteGuard] = None
        self.logger: Optional[Logger] = None
        self.resumed_from: Optional[str] = None  # the checkpoint tag folder this run continued
        self.exit_at_start = False  # SIGTERM during start-up: loop() is not run
        # the loop's bookkeeping
        self.progress = Progress(self.rank, self.train_config.progress)
        self.last_saved_step = -1  # step of the last checkpoint written or resumed from
        self.last_saved_tag: Optional[str] = None
        self.checkpoint_postponed = False  # a checkpoint due at a skipped step waits for a good one
        self.last_eval: Dict[int, float] = {}

    # ---- construction -----------------------------------------------------------------------
    def start(self) -> None:
        """Collective: process group, model, engine, resume, run files, logger."""
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if self.flags is None:
            self.flags = SignalFlags().install()
        self._init_process_group()
        self.faults.at_start()
        if self._exit_requested_at_start():  # before the slow part (model, engine, resume)
            return
        self._build_engine()
        self._seed_rank_streams()
        self._make_batches()
        self._resume()
        self.guard = NonFiniteGuard(self.model, self.engine, self.train_config.max_consecutive_nonfinite, self.rank,
                                    self.world, self.device)
        self.faults.install_router_bias(self.moe_layers, lambda: self.state.step + 1)
        self._write_run_files()
        self.logger = Logger(self.setup.output, self.rank, purge_step=self.state.step + 1 if self.state.step else None)
        self._exit_requested_at_start()

    def _init_process_group(self) -> None:
        import torch.distributed as dist

        init_distributed(self.setup.launch, timeout_s=self.train_config.collective_timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.progress.rank = self.rank
        self.device = device_for(self.setup.launch)
        self.tf32 = apply_tf32(self.device, self.train_config.allow_tf32)  # CUDA only: fp32 GEMMs on tensor cores

    def _build_engine(self) -> None:
        import deepspeed

        from ..integrations.deepspeed import DeepSpeedS2MoE, s2moe_param_groups
        from ..model import CharLM

        cfg, model_config = self.train_config, self.run_config.model
        # TP ranks of one data-parallel rank read the same batch and draw the same noise
        layout = init_model_parallel(model_config.tp_size)
        self.dp_rank, self.dp_size = layout.dp_rank, layout.dp_size
        torch.manual_seed(cfg.seed)  # identical dense weights on every rank; experts: per global id
        model = CharLM(model_config, moe_layer_cls=DeepSpeedS2MoE)  # the MoE class DeepSpeed's engine must see
        self.micro_batch = cfg.micro_batch_size(self.world, model_config.tp_size)
        groups = s2moe_param_groups(model, weight_decay=cfg.weight_decay)
        kwargs = {}
        if "optimizer" in self.setup.ds_config:
            kwargs["model_parameters"] = groups
        else:
            kwargs["optimizer"] = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                                    weight_decay=cfg.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(model=model, config=self.setup.ds_config, mpu=layout.mpu,
                                                    **kwargs)
        self.model = self.engine.module
        self.moe_layers = self.model.moe_layers()
        if cfg.compile:
            compile_model(self.model, cfg.compile_backend)

    def _seed_rank_streams(self) -> None:
        """Per-DP-rank streams for noise / dropout / InfoNCE sampling (= per rank without TP)."""
        seed = self.train_config.seed
        torch.manual_seed(seed + 1_000_003 * (self.dp_rank + 1))
        random.seed(seed + self.dp_rank)
        np.random.seed((seed + self.dp_rank) % 2 ** 32)

    def _make_batches(self) -> None:
        from ..data import ShardedBatches

        self.train_batches = ShardedBatches(self.setup.corpus.train, self.run_config.model.seq_len, self.micro_batch,
                                            self.dp_rank, self.dp_size, self.train_config.seed,
                                            pin_memory=self.device.type == "cuda")

    def _write_run_files(self) -> None:
        """config.yaml and ds_config.json: what the run used (rank 0)."""
        if self.rank != 0:
            return
        os.makedirs(self.setup.output, exist_ok=True)
        with open(os.path.join(self.setup.output, "config.yaml"), "w") as f:
            yaml.safe_dump(self.run_config.to_dict(), f, sort_keys=False)
        with open(os.path.join(self.setup.output, "ds_config.json"), "w") as f:
            json.dump(self.setup.ds_config, f, indent=2)

    def _exit_requested_at_start(self) -> bool:
        """Collective. A SIGTERM that arrived during start-up: nothing was trained since the
        checkpoint we started from, so there is nothing to save; exit 0 (requeue-friendly)."""
        _, want_exit = self.flags.agreed(self.device if self.device.type == "cuda" else None)
        if want_exit and not self.exit_at_start:
            self.exit_at_start = True
            self._say(f"SIGTERM during start-up: nothing to save (step {self.state.step}), exiting; "
                      + self._restart_point())
        return self.exit_at_start

    def _restart_point(self) -> str:
        """Where a restart of this run continues, for the start-up exit message (rank 0)."""
        if self.resumed_from:
            return f"nothing trained since {self.resumed_from}, which a restart resumes from"
        if self.rank != 0 or self.setup.args.resume is None:
            return "a restart without --resume starts from step 0"
        try:
            candidates = self._resume_candidates()
        except (OSError, ValueError):
            candidates = []
        if not candidates:
            return f"no checkpoint in {self.ckpt_dir} yet: a restart starts from step 0"
        return f"a restart with --resume {self.setup.args.resume} resumes from {os.path.join(*candidates[0])}"

    # ---- resume -------------------------------------------------------------------------------
    def _resume_candidates(self) -> List[Tuple[str, str]]:
        """(folder, tag) to try in order (rank 0 reads the folder)."""
        resume = self.setup.args.resume
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

        candidates = [self._resume_candidates() if self.rank == 0 else None]
        dist.broadcast_object_list(candidates, src=0)  # every rank resumes from the tag rank 0 chose
        for folder, tag in candidates[0]:
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
        if candidates[0]:
            tried = ", ".join(os.path.join(f, t) for f, t in candidates[0])
            raise ValueError(f"--resume {self.setup.args.resume}: no undamaged checkpoint (tried {tried}; see the "
                             "warnings above); resume from another checkpoint or start again with a new --output")
        return None

    def _resume(self) -> None:
        found = self._verified_resume_tag()
        if found is None:
            if self.setup.args.resume == "auto" and self.rank == 0:
                print(f"[s2moe-train] no checkpoint in {self.ckpt_dir}: starting from step 0", flush=True)
            return
        load_dir, tag = found
        if found != self.setup.resume_target:  # a fallback past a damaged tag: setup checked another one
            check_resumable(load_dir, tag, self.run_config, self.world)
        _, client = self.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        resumed = ResumeState.from_client_state(client)
        self.train_batches.load_state_dict(resumed.data[self.rank])
        ckpt.set_rng_state(resumed.rng[self.rank])
        self.state = resumed.train
        self.resumed_from = os.path.join(load_dir, tag)
        if self.rank == 0:
            print(f"[s2moe-train] resumed from {self.resumed_from} at step {self.state.step}", flush=True)

    # ---- the steps of the loop ----------------------------------------------------------------
    def _train_step(self, record: bool) -> StepResult:
        """Optimizer step ``state.step + 1``: forward/backward per micro-batch, then the optimizer
        step, taken on all ranks or skipped on all. ``record``: a log step (costly statistics)."""
        from ..model import lm_loss

        cfg = self.train_config
        lr = lr_at(self.state.step, cfg)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        loss_sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # no host sync per step
        accumulation = cfg.gradient_accumulation_steps
        step = self.state.step + 1  # the step being trained, as logged
        self.faults.before_step(step, self.model)
        for micro in range(accumulation):
            last_micro = micro == accumulation - 1
            for _, layer in self.moe_layers:  # InfoNCE accuracy costs a [N, N] product: log steps only
                layer.record_infonce_accuracy = record and last_micro
            x, y = next(self.train_batches)  # pinned on CUDA: the copies do not wait for the GPU
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            logits = self.engine(x)
            parts = lm_loss(self.model, logits, y)
            total = self.faults.after_forward(step, parts.total, self.model)
            self.guard.check_loss(total)
            self.engine.backward(total)
            if last_micro:
                nonfinite, signals = self._optimizer_step()
            else:
                self.engine.step()
            loss_sums += torch.stack([total.detach().double()] + [p.detach().double() for p in parts[1:]])
        self.state.tokens_seen += cfg.batch_size * self.run_config.model.seq_len
        return StepResult(loss=loss_sums / accumulation, lr=lr, nonfinite=nonfinite, signals=signals)

    def _optimizer_step(self) -> Tuple[Optional[Dict[str, Any]], AgreedSignals]:
        """Collective: (why the step was skipped on every rank, or None; the agreed signal flags).
        The signal flags ride on the guard's one all-reduce."""
        seen, mine = self.flags.local()
        causes = self.guard.decide(extra=mine)
        signals = self.flags.settle(seen, self.guard.extra)
        skip = bool(causes["loss"] or causes["grad"])
        deepspeed_skips = self.engine.skipped_steps
        with self.guard.skipping(skip):
            self.engine.step()
        if self.engine.skipped_steps > deepspeed_skips and not skip:  # DeepSpeed's own overflow check
            causes["deepspeed"], skip = True, True
        return (causes if skip else None), signals

    def _count_skipped_step(self, nonfinite: Optional[Dict[str, Any]]) -> None:
        """The guard's streak and the run's count of skipped steps; a skipped step is reported."""
        self.guard.record(self.state.step, nonfinite is not None)
        if nonfinite is None:
            return
        self.state.skipped_steps += 1
        what = (f"non-finite loss on ranks {nonfinite['loss']}, gradients on ranks {nonfinite['grad']}"
                if not nonfinite.get("deepspeed") else "DeepSpeed found a non-finite gradient norm")
        self._say(f"step {self.state.step}: {what}: step skipped on every rank ({self.guard.streak} in a row, "
                  f"stop at train.max_consecutive_nonfinite={self.train_config.max_consecutive_nonfinite})")

    def _stop_if_nonfinite_streak(self, nonfinite: Optional[Dict[str, Any]]) -> None:
        """Collective: too many skipped steps in a row raise ``NonFiniteError`` on every rank."""
        if self.guard.streak >= self.train_config.max_consecutive_nonfinite:
            self.logger.flush()
            raise self.guard.stop_error(self.state.step, nonfinite, self.last_saved_tag)

    def _log_progress(self, result: StepResult, step_time: float, steps_timed: int) -> Dict[str, float]:
        """Collective: the step's scalars (loss averaged over ranks) and MoE statistics to
        TensorBoard / metrics.jsonl, and to the progress output."""
        import torch.distributed as dist

        loss = result.loss.to(self.device)
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        total, task, balance, uncertainty = (float(v) for v in loss.cpu())
        norm = self.engine.get_global_grad_norm()
        tokens = steps_timed * self.train_config.batch_size * self.run_config.model.seq_len
        values = {"train/loss_total": total, "train/loss_task": task, "train/loss_balance": balance,
                  "train/loss_uncertainty": uncertainty, "train/lr": result.lr,
                  "train/grad_norm": float(norm) if norm is not None else float("nan"),
                  "train/tokens_per_s": tokens / max(step_time, 1e-9),
                  "train/skipped_steps": self.state.skipped_steps}
        assert set(values) == set(TRAIN_TAGS)
        self.logger.scalars(self.state.step, values)
        self.logger.moe(self.state.step, gather_moe_stats(self.moe_layers, self.device))
        self.progress.logged(self.state.step, self.train_config.steps, values)
        return values

    def _maybe_eval(self) -> None:
        if is_eval_step(self.state.step, self.train_config.eval_every, self.train_config.steps):
            self.evaluate()

    def evaluate(self) -> Dict[int, float]:
        """Collective: validation BPC at every ``train.eval_k`` and the expert-collapse diagnostics."""
        from ..data import EvalBatches

        cfg, model_config = self.train_config, self.run_config.model
        per_rank = max(1, cfg.eval_windows // self.dp_size) if cfg.eval_windows else None
        batch = min(self.micro_batch, per_rank) if per_rank else self.micro_batch
        batches = EvalBatches(self.setup.corpus.valid, model_config.seq_len, batch, self.dp_rank, self.dp_size,
                              max_batches=-(-per_rank // batch) if per_rank else None)
        result = bpc(self.model, batches, cfg.eval_k, self.device)
        self.logger.scalars(self.state.step, {f"eval/bpc_k{k}": v for k, v in result.items()})
        probe = probe_batch(self.setup.corpus.valid, model_config.seq_len, self.device)  # expert-collapse diagnostics
        self.logger.scalars(self.state.step, collapse_scalars(collapse_stats(self.model, self.moe_layers, probe)))
        self.logger.flush()
        self.last_eval = result
        self._say(f"step {self.state.step}: eval BPC " + "  ".join(f"k={k}: {v:.4f}" for k, v in result.items()))
        return result

    def _maybe_checkpoint(self, signals: AgreedSignals) -> CheckpointDecision:
        """Collective when it saves; the decision itself is ``loop_policy.checkpoint_decision``."""
        decision = checkpoint_decision(
            step=self.state.step, last_step=self.train_config.steps, ckpt_every=self.train_config.ckpt_every,
            signal_checkpoint=signals.checkpoint, signal_exit=signals.exit, postponed=self.checkpoint_postponed,
            last_saved_step=self.last_saved_step, step_skipped=self.guard.streak > 0)
        self.checkpoint_postponed = decision.postponed
        if decision.action is CheckpointAction.POSTPONE:
            self._say(f"step {self.state.step}: checkpoint postponed (the step was skipped as non-finite)")
        elif decision.action is CheckpointAction.SAVE:
            self.save()
        return decision

    def save(self) -> str:
        """Collective: a checkpoint of this step (the engine's files, then the manifest and marker)."""
        import torch.distributed as dist

        mine = {"data": self.train_batches.state_dict(), "rng": ckpt.rng_state()}
        every = [None] * self.world
        dist.all_gather_object(every, mine)  # client_state is written by rank 0 only
        client = ResumeState(train=self.state, world_size=self.world, config=self.run_config.to_dict(),
                             data=[e["data"] for e in every], rng=[e["rng"] for e in every])
        with self.faults.checkpoint_writes(self.engine, self.state.step):
            tag = ckpt.save(self.engine, self.ckpt_dir, self.state.step, client.to_client_state(),
                            self.train_config.keep_checkpoints, self.rank,
                            marker={"model": self.run_config.model.to_dict()})
        self.last_saved_step = self.state.step
        self.last_saved_tag = os.path.join(self.ckpt_dir, tag)
        self._say(f"checkpoint {self.last_saved_tag}")
        return tag

    def _say_stopping(self) -> None:
        """SIGTERM: the loop leaves after this step, with its checkpoint unless it was skipped."""
        if self.last_saved_step == self.state.step:
            self._say(f"SIGTERM: checkpointed at step {self.state.step}, exiting")
        else:
            self._say(f"SIGTERM: not checkpointing a skipped step; the last good checkpoint is "
                      f"{self.last_saved_tag}; exiting")

    def _say(self, msg: str) -> None:
        self.progress.say(msg)

    # ---- the loop -----------------------------------------------------------------------------
    def loop(self) -> int:
        """Train to ``train.steps``; returns the process exit code (0; also after SIGTERM)."""
        cfg = self.train_config
        self.progress.open(total=cfg.steps, initial=self.state.step)
        self.last_saved_step = self.state.step if self.state.step else -1
        self.last_saved_tag = self.resumed_from
        step_time, steps_timed = 0.0, 0  # since the last log step: tokens/s
        stopped = False
        while self.state.step < cfg.steps:
            log_now = is_log_step(self.state.step + 1, cfg.log_every, cfg.steps)
            started = time.perf_counter()
            result = self._train_step(record=log_now)
            step_time, steps_timed = step_time + time.perf_counter() - started, steps_timed + 1
            self.state.step += 1
            self._count_skipped_step(result.nonfinite)
            if log_now or result.nonfinite is not None:
                self._log_progress(result, step_time, steps_timed)
                step_time, steps_timed = 0.0, 0
            self.progress.advance()
            self._stop_if_nonfinite_streak(result.nonfinite)
            self._maybe_eval()
            if self._maybe_checkpoint(result.signals).stop:
                self._say_stopping()
                stopped = True
                break
        self.progress.close()
        if not stopped:
            if not self.last_eval:  # resumed a finished run: still report its BPC
                self.evaluate()
            self._finish()
        self.close()
        return 0

    def _finish(self) -> None:
        if self.rank != 0:
            return
        summary = {"step": self.state.step, "bpc_valid": {str(k): v for k, v in self.last_eval.items()},
                   "tensorboard": self.logger.tb_dir, "checkpoint": self.last_saved_tag,
                   "output": self.setup.output}
        with open(os.path.join(self.setup.output, "final_eval.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"[s2moe-train] done: {self.state.step} steps", flush=True)
        for k, v in self.last_eval.items():
            print(f"[s2moe-train] final validation BPC k={k}: {v:.4f}", flush=True)
        print(f"[s2moe-train] TensorBoard logs: {self.logger.tb_dir}", flush=True)
        print(f"[s2moe-train] checkpoint: {summary['checkpoint']}", flush=True)

    def close(self) -> None:
        """Close the metrics logger, if start() got as far as opening it."""
        if self.logger is not None:
            self.logger.close()
            self.logger = None


def train(args: TrainArgs, flags: Optional[SignalFlags] = None) -> int:
    """``flags``: signal handlers installed by the caller (the CLI, at entry); else installed at
    start and removed at the end."""
    import torch.distributed as dist

    trainer = Trainer(setup(args), flags)
    try:
        trainer.start()
        code = 0 if trainer.exit_at_start else trainer.loop()
        trainer.close()
    except Exception as e:
        if getattr(e, "agreed", False):  # every rank raised it at the same point: leave in order
            trainer.close()
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
