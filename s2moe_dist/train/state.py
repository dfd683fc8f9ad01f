"""The trainer's declared state: the counters it keeps while training, and what a checkpoint holds
to resume them.

``TrainState`` is live (one per process, changed every step). ``ResumeState`` is its checkpoint
form: the counters plus every rank's data position and RNG streams, written by rank 0 as
DeepSpeed's ``client_state["s2moe"]``. Its keys are those checkpoints have always had (``step``,
``world_size``, ``tokens_seen``, ``skipped_steps``, ``config``, ``data``, ``rng``), so checkpoints
written by earlier versions resume, and ``s2moe-eval`` / ``train.load.read_client_state`` read
both; checkpoints older than the ``tokens_seen`` / ``skipped_steps`` counters resume with them 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

CLIENT_STATE_KEY = "s2moe"  # the trainer's entry in DeepSpeed's client_state


@dataclass
class TrainState:
    """What the training loop advances. ``step``: optimizer steps done (the last one trained, as
    logged); ``tokens_seen``: training tokens of those steps, all ranks together; ``skipped_steps``:
    steps skipped as non-finite over the whole run (``train/skipped_steps``)."""
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0


@dataclass
class ResumeState:
    """A checkpoint's client state: ``train`` plus what a restart needs to continue the same data
    order and noise. ``data`` / ``rng``: per global rank, the batch iterator's position and the
    RNG states (``checkpoint.rng_state``); ``config``: the run config (``RunConfig.to_dict``),
    read by ``s2moe-eval``; ``world_size``: the ranks that wrote it (the data order depends on it)."""
    train: TrainState
    world_size: int
    config: Dict[str, Any] = field(default_factory=dict)
    data: List[Dict[str, Any]] = field(default_factory=list)
    rng: List[Dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"step": self.train.step, "world_size": self.world_size, "tokens_seen": self.train.tokens_seen,
                "skipped_steps": self.train.skipped_steps, "config": self.config, "data": list(self.data),
                "rng": list(self.rng)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ResumeState":
        missing = [k for k in ("step", "world_size", "data", "rng") if k not in d]
        if missing:
            raise ValueError(f"checkpoint client state {CLIENT_STATE_KEY!r} lacks {missing}: not written by "
                             "s2moe-train; resume from a checkpoint of s2moe-train")
        train = TrainState(step=int(d["step"]), tokens_seen=int(d.get("tokens_seen", 0)),
                           skipped_steps=int(d.get("skipped_steps", 0)))
        return cls(train=train, world_size=int(d["world_size"]), config=dict(d.get("config") or {}),
                   data=list(d["data"]), rng=list(d["rng"]))

    def to_client_state(self) -> Dict[str, Any]:
        """The ``client_state`` argument of ``engine.save_checkpoint``."""
        return {CLIENT_STATE_KEY: self.to_dict()}

    @classmethod
    def from_client_state(cls, client: Dict[str, Any]) -> "ResumeState":
        """From what ``engine.load_checkpoint`` returns as the client state."""
        if CLIENT_STATE_KEY not in client:
            raise ValueError(f"checkpoint has no {CLIENT_STATE_KEY!r} client state: not written by s2moe-train; "
                             "resume from a checkpoint of s2moe-train")
        return cls.from_dict(client[CLIENT_STATE_KEY])

