"""The training loop's decisions, as pure functions of plain values (no engine, no process group):
the learning rate of a step, when to log, when to validate, and whether to checkpoint after a step.

Every input that differs between ranks is agreed before it reaches these functions (the signal
flags ride on the step's one all-reduce; a skipped step is skipped on every rank), so every rank
takes the same decision without another collective.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass


def lr_at(step: int, t) -> float:
    """lr for optimizer step ``step`` (0-based) under ``t`` (a TrainConfig): linear warmup, then
    cosine/linear decay to ``lr * min_lr_ratio`` at ``t.steps`` (or constant)."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    span = max(1, t.steps - t.warmup_steps)
    frac = min(1.0, (step - t.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if t.lr_schedule == "cosine" else 1 - frac
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * shape)


def is_log_step(step: int, log_every: int, last_step: int) -> bool:
    """Log the scalars of step ``step`` (1-based, the step being trained): every ``log_every``
    steps (0: never) and at the last step of the run."""
    return log_every > 0 and step % log_every == 0 or step == last_step


def is_eval_step(step: int, eval_every: int, last_step: int) -> bool:
    """Validate after step ``step``: every ``eval_every`` steps (0: only at the end) and at the last."""
    return eval_every > 0 and step % eval_every == 0 or step == last_step


class CheckpointAction(enum.Enum):
    NONE = "none"  # nothing due (or this step is already saved)
    SAVE = "save"
    POSTPONE = "postpone"  # due, but the step was skipped as non-finite: wait for a good step


@dataclass(frozen=True)
class CheckpointDecision:
    action: CheckpointAction
    postponed: bool  # a checkpoint is still owed after this step (the next decision's ``postponed``)
    stop: bool  # leave the loop after this step (SIGTERM): with the checkpoint when ``action`` is SAVE


def checkpoint_decision(step: int, last_step: int, ckpt_every: int, signal_checkpoint: bool, signal_exit: bool,
                        postponed: bool, last_saved_step: int, step_skipped: bool) -> CheckpointDecision:
    """After optimizer step ``step`` (1-based) of a run of ``last_step`` steps: a checkpoint is due
    every ``ckpt_every`` steps (0: never periodically), at the last step, on a signal agreed over
    ranks (``signal_checkpoint``: SIGUSR1 or SIGTERM; ``signal_exit``: SIGTERM), and while one is
    ``postponed``. A due checkpoint is postponed when the step was skipped as non-finite
    (``step_skipped``): a skipped step is never saved over the last good checkpoint; it is written
    at the next good step. Nothing is written twice for one step (``last_saved_step``: the step of
    the last checkpoint written or resumed from, -1 for none). ``stop`` follows SIGTERM alone:
    during a non-finite streak the run stops without saving."""
    periodic = ckpt_every > 0 and step % ckpt_every == 0
    due = periodic or signal_checkpoint or signal_exit or postponed or step == last_step
    if not due or last_saved_step == step:
        return CheckpointDecision(CheckpointAction.NONE, postponed, signal_exit)
    if step_skipped:
        return CheckpointDecision(CheckpointAction.POSTPONE, True, signal_exit)
    return CheckpointDecision(CheckpointAction.SAVE, False, signal_exit)
