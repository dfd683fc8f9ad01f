"""Per-layer routing statistics of the last forward (logged to TensorBoard by ``train/metrics.py``)."""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch


@dataclass(frozen=True)
class RoutingStats:
    """Detached statistics of one S2MoE forward; recording them costs no host sync.

    Attributes:
        expert_counts: [E] int64 slots kept per global expert, both streams summed.
        drop_fraction: Share of the routed slots dropped by capacity: a float, or a 0-dim tensor
            when capacity applied (read by the logger when it logs, not at every step).
        gate_mean: Mean of the gate ``g`` over the tokens; None for one stream (SMoE, clean eval).
        infonce_accuracy: InfoNCE top-1 accuracy of the last training forward; None unless the
            layer's ``record_infonce_accuracy`` is set.
    """

    expert_counts: torch.Tensor
    drop_fraction: Union[float, torch.Tensor]
    gate_mean: Optional[torch.Tensor] = None
    infonce_accuracy: Optional[torch.Tensor] = None

    def as_mapping(self) -> Mapping[str, Any]:
        """Read-only ``{name: value}`` of the fields that are set (the former ``last_stats`` dict)."""
        return types.MappingProxyType({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                       if getattr(self, f.name) is not None})
