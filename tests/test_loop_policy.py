"""The training loop's pure decisions (``train/loop_policy.py``), the checkpoint's client state
(``train/state.py``) and the one fault-injection seam (``train/faults.py``), without ranks.

The checkpoint decision is checked over every combination of its inputs against the rule the
loop applied inline before it was a function (``_inline_rule`` below, transcribed from the loop of
c7a59f4), then along the scenarios docs/operations.md promises."""
import itertools
import os
import re

import pytest

from s2moe_dist.train.faults import FaultInjector, parse
from s2moe_dist.train.loop_policy import (CheckpointAction, CheckpointDecision, checkpoint_decision, is_eval_step,
                                          is_log_step)
from s2moe_dist.train.state import ResumeState, TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inline_rule(step, steps, ckpt_every, want_ckpt, want_exit, pending, last_saved, streak):
    """The loop body's checkpoint lines as they were: (saved, postponed message, pending after, exit)."""
    saved = postponed_msg = False
    periodic = ckpt_every and step % ckpt_every == 0
    if (periodic or want_ckpt or want_exit or pending or step == steps) and last_saved != step:
        pending = streak > 0
        if pending:
            postponed_msg = True
        else:
            saved = True
    return saved, postponed_msg, pending, want_exit


def test_checkpoint_decision_equals_the_inline_rule_for_every_input():
    cases = 0
    for steps, every, step in itertools.product((5, 6), (0, 1, 2, 3), range(1, 7)):
        if step > steps:
            continue
        for want_ckpt, want_exit, pending, streak, last_saved in itertools.product(
                (False, True), (False, True), (False, True), (0, 1, 3), (-1, step - 2, step - 1, step)):
            got = checkpoint_decision(step=step, last_step=steps, ckpt_every=every, signal_checkpoint=want_ckpt,
                                      signal_exit=want_exit, postponed=pending, last_saved_step=last_saved,
                                      step_skipped=streak > 0)
            saved, postponed_msg, pending_after, stop = _inline_rule(step, steps, every, want_ckpt, want_exit,
                                                                     pending, last_saved, streak)
            expected = (CheckpointAction.SAVE if saved else CheckpointAction.POSTPONE if postponed_msg
                        else CheckpointAction.NONE)
            assert got == CheckpointDecision(expected, pending_after, stop), (step, steps, every, want_ckpt,
                                                                               want_exit, pending, last_saved, streak)
            cases += 1
    assert cases == 4 * (5 + 6) * 96  # every combination was checked


def _run_decisions(steps, every, skipped=(), usr1=(), sigterm=None, resumed_at=0):
    """Drive the decision like the loop does; returns (saved steps, postponed steps, stop step)."""
    saved, postponed_at, pending = [], [], False
    last_saved = resumed_at if resumed_at else -1
    for step in range(resumed_at + 1, steps + 1):
        d = checkpoint_decision(step=step, last_step=steps, ckpt_every=every, signal_checkpoint=step in usr1
                                or step == sigterm, signal_exit=step == sigterm, postponed=pending,
                                last_saved_step=last_saved, step_skipped=step in skipped)
        pending = d.postponed
        if d.action is CheckpointAction.SAVE:
            saved.append(step)
            last_saved = step
        elif d.action is CheckpointAction.POSTPONE:
            postponed_at.append(step)
        if d.stop:
            return saved, postponed_at, step
    return saved, postponed_at, None


def test_periodic_and_final_checkpoints():
    assert _run_decisions(10, 4) == ([4, 8, 10], [], None)
    assert _run_decisions(10, 0) == ([10], [], None)  # ckpt_every 0: only at the end
    assert _run_decisions(8, 4) == ([4, 8], [], None)  # the last step is periodic too: saved once
    assert _run_decisions(10, 4, resumed_at=8) == ([10], [], None)


def test_a_checkpoint_due_at_a_skipped_step_waits_for_the_next_good_step():
    assert _run_decisions(12, 4, skipped={4, 5}) == ([6, 8, 12], [4, 5], None)
    assert _run_decisions(10, 0, skipped={10}) == ([], [10], None)  # a skipped last step is never saved


def test_signals_checkpoint_sigterm_stops_and_never_saves_a_skipped_step():
    assert _run_decisions(10, 0, usr1={3, 7}) == ([3, 7, 10], [], None)  # SIGUSR1: save, train on
    assert _run_decisions(10, 4, sigterm=6) == ([4, 6], [], 6)  # SIGTERM: save, stop
    assert _run_decisions(10, 4, sigterm=4) == ([4], [], 4)  # one save when periodic and signal coincide
    assert _run_decisions(10, 5, skipped={5, 6}, sigterm=6) == ([], [5, 6], 6)  # stop without saving


def test_log_and_eval_steps():
    for step, every, last in itertools.product(range(1, 13), range(0, 5), (6, 12)):
        assert is_log_step(step, every, last) == bool(every > 0 and step % every == 0 or step == last)
        assert is_eval_step(step, every, last) == bool(every and step % every == 0 or step == last)
    assert [s for s in range(1, 11) if is_log_step(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if is_eval_step(s, 0, 10)] == [10]


# ---- the checkpoint's client state ----------------------------------------------------------------
def _written_by_c7a59f4():
    """client_state as c7a59f4's Trainer._client_state built it, for a 2-rank run at step 30."""
    data = [{"epoch": 0, "position": 30 * 4, "rank": r} for r in range(2)]
    rng = [{"torch": [1, 2, 3], "python": (3, (r,), None), "numpy": ("MT19937", [r], 0, 0, 0.0)} for r in range(2)]
    return {"s2moe": {"step": 30, "world_size": 2, "tokens_seen": 30 * 16 * 128, "skipped_steps": 1,
                      "config": {"model": {"d_model": 128}, "train": {"steps": 100}}, "data": data, "rng": rng}}


def test_client_state_of_an_earlier_checkpoint_reads_and_writes_back_identically():
    old = _written_by_c7a59f4()
    state = ResumeState.from_client_state(old)
    assert state.train == TrainState(step=30, tokens_seen=30 * 16 * 128, skipped_steps=1)
    assert state.world_size == 2 and state.data[1]["rank"] == 1 and state.rng[0]["numpy"][1] == [0]
    assert state.to_client_state() == old  # same keys, same values: earlier readers (s2moe-eval) keep working


def test_checkpoint_from_before_the_counters_resumes_with_them_zero():
    old = _written_by_c7a59f4()["s2moe"]
    del old["tokens_seen"], old["skipped_steps"]
    assert ResumeState.from_dict(old).train == TrainState(step=30, tokens_seen=0, skipped_steps=0)


def test_a_client_state_not_from_the_trainer_is_refused_by_name():
    with pytest.raises(ValueError, match=r"no 's2moe' client state"):
        ResumeState.from_client_state({"other": {}})
    broken = _written_by_c7a59f4()["s2moe"]
    del broken["rng"], broken["world_size"]
    with pytest.raises(ValueError, match=re.escape("lacks ['world_size', 'rng']")):
        ResumeState.from_dict(broken)


# ---- the fault seam ----------------------------------------------------------------------------------
class _Writer:
    def __init__(self):
        self.paths = []

    def save(self, state_dict, path):
        self.paths.append(path)


class _Engine:
    def __init__(self):
        self.checkpoint_engine = _Writer()


def test_without_faults_every_hook_is_a_no_op():
    none = FaultInjector([], rank=0)
    none.at_start()
    none.before_step(3, model=None)
    loss = object()
    assert none.after_forward(3, loss, model=None) is loss
    engine = _Engine()
    with none.checkpoint_writes(engine, 3):
        assert "save" not in engine.checkpoint_engine.__dict__  # the writer is not wrapped


def test_checkpoint_write_faults_hit_only_their_step_and_rank_and_are_undone(tmp_path):
    inject = FaultInjector(parse("enospc_in_save@4:1"), rank=1)
    engine = _Engine()
    with inject.checkpoint_writes(engine, 3):  # another step: the plain writer
        engine.checkpoint_engine.save({}, "a.pt")
    assert engine.checkpoint_engine.paths == ["a.pt"]
    with pytest.raises(RuntimeError):  # torch.save to /dev/full: the disk-full error
        with inject.checkpoint_writes(engine, 4):
            engine.checkpoint_engine.save({"x": 1}, str(tmp_path / "b.pt"))
    assert "save" not in engine.checkpoint_engine.__dict__ and engine.checkpoint_engine.paths == ["a.pt"]
    with FaultInjector(parse("enospc_in_save@4:1"), rank=0).checkpoint_writes(engine, 4):  # another rank
        assert "save" not in engine.checkpoint_engine.__dict__


def test_faults_are_injected_from_the_trainer_only():
    users = []
    for folder, _, files in os.walk(os.path.join(ROOT, "s2moe_dist")):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and not path.endswith(os.path.join("train", "faults.py")):
                with open(path) as f:
                    if re.search(r"(from|import)\s+[.\w]*faults\b|FaultInjector|\bfaults\.(?!py\b)", f.read()):
                        users.append(os.path.relpath(path, ROOT))
    assert users == [os.path.join("s2moe_dist", "train", "trainer.py")]


def test_the_trainer_declares_every_attribute_in_init_and_never_probes_itself():
    import ast

    with open(os.path.join(ROOT, "s2moe_dist", "train", "trainer.py")) as f:
        source = f.read()
    (trainer,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]

    def assigned(fn):
        return {t.attr for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    methods = [n for n in trainer.body if isinstance(n, ast.FunctionDef)]
    declared = assigned(next(m for m in methods if m.name == "__init__"))
    later = set().union(*(assigned(m) for m in methods if m.name != "__init__"))
    assert later - declared == set(), "attributes first set outside __init__"
    assert not re.search(r"(getattr|hasattr)\(self\b", ast.get_source_segment(source, trainer))
