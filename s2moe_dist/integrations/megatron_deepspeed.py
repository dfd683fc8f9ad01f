"""S2MoE in Megatron-DeepSpeed (microsoft/Megatron-DeepSpeed): one call in ``pretrain_gpt.py``.

    from s2moe_dist.integrations import megatron_deepspeed
    megatron_deepspeed.install()          # after the megatron imports, before pretrain(...)

``install()``:

- replaces ``megatron.model.transformer.MoE`` (Megatron-DeepSpeed's name for
  ``deepspeed.moe.layer.MoE``, looked up when each ``ParallelTransformerLayer`` is built) by
  ``MegatronDeepSpeedS2MoE``: the GPT model's ``--num-experts`` layers become S2MoE layers, built
  from the same 14 arguments, with the S2MoE knobs read from the ``--s2moe-*`` flags;
- adds the ``--s2moe-*`` flags to Megatron's argument parser (``add_s2moe_args``, chained with any
  ``extra_args_provider`` the script passes; a script that builds its own provider can call
  ``add_s2moe_args(parser)`` in it instead).

Nothing else changes: Megatron-DeepSpeed's loss stays ``lm + moe_loss_coeff * sum(l_aux)`` (the
InfoNCE gradient is attached to each layer's output, ``moe/aux_grad.py``, and scaled by the
DeepSpeed engine like the loss), its optimizer groups (``split_params_into_different_moe_groups_for_optimizer``)
and checkpoints (DeepSpeed's MoE files) work as with DeepSpeed's MoE.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict

from .deepspeed import DeepSpeedS2MoE

# flag -> (S2MoEConfig field, type, help); None (the default) keeps S2MoEConfig's value
S2MOE_FLAGS = {
    "--s2moe-moe-type": ("moe_type", str, "s2moe (default) or smoe (the same layer without the noisy stream)"),
    "--s2moe-uncertainty-coef": ("uncertainty_coef", float, "beta, weight of the InfoNCE uncertainty loss (0.1)"),
    "--s2moe-noise-mult-std": ("noise_mult_std", float, "std of the multiplicative noise n1 (1.0)"),
    "--s2moe-noise-add-std": ("noise_add_std", float, "std of the additive noise n2 (1.0)"),
    "--s2moe-infonce-temperature": ("infonce_temperature", float, "InfoNCE temperature (0.1)"),
    "--s2moe-infonce-max-tokens": ("infonce_max_tokens", int, "tokens sampled for InfoNCE per layer (1024)"),
    "--s2moe-noisy-routing": ("noisy_routing", str, "own (default): the noisy stream is routed itself; shared"),
    "--s2moe-uncertainty-on": ("uncertainty_on", str, "input (default) or output: what InfoNCE compares"),
    "--s2moe-eval-mode": ("eval_mode", str, "clean (default, one stream) or noisy (both, seeded)"),
    "--s2moe-eval-k": ("eval_k", int, "experts per token in evaluation (default: --topk)"),
    "--s2moe-noisy-gate-policy": ("noisy_gate_policy", str, "DeepSpeed's Jitter or RSample on the router"),
}


def add_s2moe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: the ``--s2moe-*`` flags."""
    group = parser.add_argument_group(title="S2MoE")
    for flag, (_, typ, text) in S2MOE_FLAGS.items():
        group.add_argument(flag, type=typ, default=None, help=text)
    return parser


def s2moe_kwargs(args: Any) -> Dict[str, Any]:
    """S2MoEConfig keywords from Megatron's parsed args: the ``--s2moe-*`` flags given, and
    ``balance_coef = --moe-loss-coeff`` (what the client's loss weights ``l_aux`` by; used for logging
    through ``s2moe_aux_loss``)."""
    out = {}
    for flag, (field, _, _) in S2MOE_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            out[field] = value
    coeff = getattr(args, "moe_loss_coeff", None)
    if coeff is not None:
        out["balance_coef"] = coeff
    return out


class MegatronDeepSpeedS2MoE(DeepSpeedS2MoE):
    """``deepspeed.moe.layer.MoE``'s signature (what Megatron-DeepSpeed calls) plus the ``--s2moe-*``
    knobs of the running job (``megatron.get_args()``)."""

    def __init__(self, hidden_size, *args, **kwargs):
        from megatron import get_args
        super().__init__(hidden_size, *args, **{**s2moe_kwargs(get_args()), **kwargs})


def _chain(provider):
    def extra_args(parser):
        parser = add_s2moe_args(parser)
        return provider(parser) if provider is not None else parser
    extra_args.s2moe = True
    return extra_args


def install() -> None:
    """Make Megatron-DeepSpeed's GPT model build S2MoE layers and parse the ``--s2moe-*`` flags.
    Idempotent. Raises ImportError naming the fix when Megatron-DeepSpeed is not importable."""
    try:
        import megatron.initialize as initialize
        import megatron.model.transformer as transformer
    except ImportError as e:
        raise ImportError("s2moe_dist.integrations.megatron_deepspeed.install() needs Megatron-DeepSpeed's "
                          "'megatron' package importable (run from a microsoft/Megatron-DeepSpeed checkout, or put "
                          "it on PYTHONPATH)") from e
    if not hasattr(transformer, "MoE") or not hasattr(initialize, "parse_args"):
        raise ImportError("this 'megatron' package is not Megatron-DeepSpeed (megatron.model.transformer.MoE or "
                          "megatron.initialize.parse_args missing); for Megatron-core use "
                          "s2moe_dist.integrations.megatron")
    transformer.MoE = MegatronDeepSpeedS2MoE
    parse_args = initialize.parse_args
    if getattr(parse_args, "s2moe", False):
        return

    def parse_args_with_s2moe(extra_args_provider=None, ignore_unknown_args=False):
        return parse_args(_chain(extra_args_provider), ignore_unknown_args)

    parse_args_with_s2moe.s2moe = True
    initialize.parse_args = parse_args_with_s2moe
