"""Typed optimizer state of a checkpoint, as the resharder reads it.

Two shapes: ``Zero0RankStates`` (ZeRO-0 files as saved: per EP rank, entries by parameter position;
the files carry no names) and ``CanonicalState`` (every parameter's full state by canonical,
EP-independent name). ``SavedLayout`` says which optimizer format a tag folder holds.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

PORTABLE_FILE = "s2moe_optim_states.pt"
PORTABLE_FORMAT = "s2moe-portable-optimizer-state-v1"

Entry = Dict[str, Any]  # one parameter: {"fp32"?: master weights, optimizer key: tensor or scalar}


class OptimizerFormat(enum.Enum):
    NONE = "none"  # no optimizer files
    ZERO0 = "zero0"  # one torch optimizer state per EP rank
    ZERO12 = "zero12"  # flat fp32 partitions per data-parallel rank
    PORTABLE = "portable"  # CanonicalState written by the offline converter


@dataclass(frozen=True)
class SavedLayout:
    format: OptimizerFormat
    ep_size: Optional[int]  # None: portable (EP-independent) or no optimizer state
    dp_world_size: Optional[int]
    num_experts: Optional[List[int]]  # per MoE layer

    def loads_natively(self, ep_size: int, dp_world_size: int, zero_stage: int) -> bool:
        """DeepSpeed's own load restores this layout into an engine of ``ep_size`` / data-parallel
        size / ZeRO stage unchanged (ZeRO-0 files do not depend on the data-parallel size)."""
        if self.format is OptimizerFormat.NONE:
            return True
        if self.format is OptimizerFormat.ZERO0:
            return self.ep_size == ep_size and zero_stage == 0
        if self.format is OptimizerFormat.ZERO12:
            return self.ep_size == ep_size and self.dp_world_size == dp_world_size and zero_stage in (1, 2)
        return False


@dataclass
class Zero0RankStates:
    ranks: List[List[Entry]]  # [EP rank][position]
    moe: List[bool]  # [position]: an expert parameter

    @property
    def ep_size(self) -> int:
        return len(self.ranks)


@dataclass
class CanonicalState:
    params: Dict[str, Entry]  # canonical name -> entry (experts: one per global expert)
    step: Any
    ep_size: int  # the saved EP size
    source: OptimizerFormat  # the format it was read from

    def to_portable(self) -> Dict[str, Any]:
        """The dict of ``PORTABLE_FILE``."""
        return {"step": self.step, "params": self.params, "ep_size": self.ep_size, "kind": self.source.value,
                "format": PORTABLE_FORMAT}

    @classmethod
    def from_portable(cls, saved: Dict[str, Any], where: str) -> "CanonicalState":
        if saved.get("format") != PORTABLE_FORMAT:
            raise ValueError(f"{where}: unknown format {saved.get('format')!r}")
        return cls(params=saved["params"], step=saved["step"], ep_size=saved["ep_size"],
                   source=OptimizerFormat(saved["kind"]))
