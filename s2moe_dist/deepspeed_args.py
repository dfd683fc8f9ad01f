"""``deepspeed.moe.layer.MoE``'s calling conventions, translated into an ``S2MoEConfig``.

S2MoE's own convention is ``S2MoE(hidden_size, num_experts, k, ffn_hidden_size, ep_size, **fields)``
or ``S2MoE(config=S2MoEConfig(...))``. DeepSpeed's is ``MoE(hidden_size, expert, num_experts,
ep_size, k, ...)`` with an expert module; such a call gets DeepSpeed's defaults where S2MoE's
differ, so swapping the import keeps the client's routing (docs/deepspeed.md). DeepSpeed's
keywords S2MoE accepts only to refuse a value (``use_tutel=True``) and its ``"None"`` string
for "no noisy gate" are handled here too, so the core config holds only what S2MoE computes.

Pure Python (no torch, no DeepSpeed at import): the pure ``S2MoELayer``, the DeepSpeed-facing
``integrations.deepspeed.DeepSpeedS2MoE`` and ``S2MoEConfig`` all read it.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

# Positional order of deepspeed.moe.layer.MoE after hidden_size (used when arg 2 is a module).
DEEPSPEED_POSITIONAL = ("expert", "num_experts", "ep_size", "k", "capacity_factor", "eval_capacity_factor",
                        "min_capacity", "use_residual", "noisy_gate_policy", "drop_tokens", "use_rts",
                        "use_tutel", "enable_expert_tensor_parallelism", "top2_2nd_expert_sampling")
S2MOE_POSITIONAL = ("num_experts", "k", "ffn_hidden_size", "ep_size")
# deepspeed.moe.layer.MoE's defaults where S2MoEConfig's differ (a call with an expert module).
DEEPSPEED_DEFAULTS = {"num_experts": 1, "k": 1, "drop_tokens": True, "use_rts": True,
                      "top2_2nd_expert_sampling": True}
NOISY_GATE_POLICIES = (None, "Jitter", "RSample")


def layer_config_from_args(hidden_size=None, *args, config=None, **kwargs) -> Tuple[Any, Optional[Any]]:
    """Parse S2MoE's or deepspeed.moe.layer.MoE's call into ``(S2MoEConfig, expert module or None)``.

    With an expert module (DeepSpeed's convention, positional or ``expert=``), arguments left out
    take DeepSpeed's defaults (``DEEPSPEED_DEFAULTS``: num_experts 1, k 1, drop_tokens, use_rts and
    top2_2nd_expert_sampling True); without one, S2MoEConfig's (16 experts, top-2, dropless)."""
    from torch import nn

    from .config import S2MoEConfig
    if config is not None:
        if args or kwargs.keys() - {"expert"}:
            raise ValueError("S2MoE: pass either config=S2MoEConfig(...) or keyword arguments, not both")
        return config, kwargs.get("expert")
    names = DEEPSPEED_POSITIONAL if args and isinstance(args[0], nn.Module) else S2MOE_POSITIONAL
    if len(args) > len(names):
        raise TypeError(f"S2MoE takes at most {len(names) + 1} positional arguments")
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"S2MoE got multiple values for argument {name!r}")
        kwargs[name] = value
    expert = kwargs.pop("expert", None)
    if expert is not None and not isinstance(expert, nn.Module):
        raise ValueError(f"S2MoE.expert={expert!r} is invalid: must be a torch.nn.Module or None")
    if expert is not None:
        kwargs = {**DEEPSPEED_DEFAULTS, **kwargs}
    return S2MoEConfig(hidden_size=hidden_size, **kwargs), expert


def normalize_noisy_gate_policy(value: Any) -> Any:
    """DeepSpeed accepts the string ``"None"`` for "no policy"."""
    return None if value == "None" else value


def check_deepspeed_fields(owner: str, fields: Dict[str, Any]) -> None:
    """Refuse the DeepSpeed keyword values S2MoE accepts only to refuse (``use_tutel=True``) and
    unknown ``noisy_gate_policy`` values; ``owner`` names the config in the message."""
    from .config import check_choice, config_error
    if fields.get("use_tutel"):
        raise config_error(owner, "use_tutel", True,
                           "Tutel kernels are not used: S2MoE's dispatcher is dropless and sorted; "
                           "set use_tutel=False")
    check_choice(owner, "noisy_gate_policy", fields.get("noisy_gate_policy"), NOISY_GATE_POLICIES)
