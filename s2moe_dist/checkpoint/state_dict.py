"""State-dict layout of S2MoE as DeepSpeed's MoE checkpoints expect it.

DeepSpeed's engine writes one file per GLOBAL expert, from the layer's state-dict keys of the form
``<layer>.deepspeed_moe.experts.deepspeed_experts.<local id>.<param>`` (``_save_moe_checkpoint``),
and reads them back into the same keys, renumbered for the loading rank (``load_moe_state_dict``).
S2MoE keeps all local experts in one tensor per matrix (``experts.w1`` [E_local, d, h], ...), so:

- on save (``state_dict`` post-hook) the bank is split:  ``experts.w1[i]`` ->
  ``deepspeed_moe.experts.deepspeed_experts.<i>.w1`` (user expert modules:
  ``experts.experts.<i>.<path>`` -> ``deepspeed_moe.experts.deepspeed_experts.<i>.<path>``);
- on load (``load_state_dict`` pre-hook) the split keys are stacked back. Both layouts load, and a
  state dict holding ALL ``num_experts`` experts (from a single-process model, any EP size) loads
  into an expert-parallel layer, which keeps its block ``[first_expert, first_expert + E_local)``.

DeepSpeed takes EVERY key of an MoE layer containing "expert" for an expert weight (and drops it
from the main model file), so other keys of the layer that contain the word (X-MoE's
``router.expert_embeddings``, StableMoE's ``router.expert_centroids``) are written with a capital
E (``router.Expert_embeddings``) and renamed back on load.

The files are then independent of the EP size: a checkpoint saved with one ``ep_size`` loads with
another (see ``live.py`` / ``convert.py`` for the optimizer state). Key names: ``keys.py``. No
DeepSpeed import here.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Dict, MutableMapping

import torch

from ..moe.experts import ExpertBank
from . import keys
from .keys import DS_EXPERTS


def _replace_items(state_dict: MutableMapping, new_items) -> None:
    """Rewrite ``state_dict`` in place with ``new_items`` (keeps key order readable)."""
    state_dict.clear()
    state_dict.update(new_items)


def split_expert_state(module, state_dict, prefix, local_metadata) -> None:
    """``state_dict`` post-hook of a DeepSpeed S2MoE layer: batched bank -> one key per local expert."""
    items = []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            items.append((key, value))
            continue
        parsed = keys.parse_expert_key(key)
        if parsed is None or parsed.layer != prefix:  # hide "expert" from DeepSpeed's expert-key filter
            items.append((prefix + keys.hide_expert_word(key[len(prefix):]), value))
        elif parsed.layout is keys.Layout.BANK:  # experts.w1 -> <i>.w1
            items.extend((keys.deepspeed_key(prefix, i, parsed.param), value[i]) for i in range(value.shape[0]))
        else:  # experts.experts.<i>.<path> -> <i>.<path>
            items.append((keys.deepspeed_key(prefix, parsed.expert, parsed.param), value))
    _replace_items(state_dict, items)


def _expert_block(module, ids, what: str):
    """Which of the ids present to keep: the local ids 0..E_local-1, or this rank's block of a full
    (all ``num_experts``) state dict. Anything else is an error (wrong checkpoint / EP size)."""
    n_local, n_all = module.num_local_experts, module.num_experts
    if sorted(ids) == list(range(n_local)):
        return list(range(n_local))
    if sorted(ids) == list(range(n_all)):
        return list(range(module.first_expert, module.first_expert + n_local))
    raise ValueError(f"S2MoE state dict for {what} holds experts {sorted(ids)}; this layer expects its "
                     f"{n_local} local experts (ids 0..{n_local - 1}) or all {n_all} experts")


def stack_expert_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs) -> None:
    """``load_state_dict`` pre-hook: DeepSpeed's per-expert keys (or a full-size batched bank) ->
    this layer's batched bank of local experts."""
    is_bank = isinstance(module.experts, ExpertBank)
    for key in [k for k in state_dict if k.startswith(prefix) and keys.has_hidden_expert_word(k[len(prefix):])]:
        state_dict[prefix + keys.unhide_expert_word(key[len(prefix):])] = state_dict.pop(key)
    try:
        per_expert: Dict[str, Dict[int, torch.Tensor]] = defaultdict(dict)
        for key in [k for k in state_dict if k.startswith(prefix + DS_EXPERTS)]:
            parsed = keys.parse_expert_key(key)  # a malformed key is a load error
            per_expert[parsed.param][parsed.expert] = state_dict.pop(key)
        for name, by_id in per_expert.items():
            keep = _expert_block(module, by_id.keys(), keys.bank_key(prefix, name))
            if is_bank:
                state_dict[keys.bank_key(prefix, name)] = torch.stack([by_id[i] for i in keep])
            else:
                for local, i in enumerate(keep):
                    state_dict[keys.module_key(prefix, local, name)] = by_id[i]
        if is_bank:  # a batched bank holding all experts (single-process checkpoint)
            for name, p in module.experts.named_parameters(recurse=False):
                key = keys.bank_key(prefix, name)
                t = state_dict.get(key)
                if t is not None and t.shape[0] != p.shape[0]:
                    keep = _expert_block(module, range(t.shape[0]), key)
                    state_dict[key] = t[keep[0]:keep[-1] + 1]
    except ValueError as e:
        error_msgs.append(str(e))


def batched_expert_state_dict(state_dict: MutableMapping) -> "OrderedDict[str, torch.Tensor]":
    """Convert a state dict in DeepSpeed's per-expert layout into S2MoE's batched layout
    (``<layer>.experts.w1`` [E, d, h], ...), e.g. to load a DeepSpeed-trained model into the pure
    PyTorch ``S2MoELayer``. Expert ids are stacked in increasing order; user expert modules keep
    one module per expert (``<layer>.experts.experts.<i>.<path>``)."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    groups: Dict[str, Dict[int, torch.Tensor]] = defaultdict(dict)
    for key, value in state_dict.items():
        parsed = keys.parse_expert_key(key)
        if parsed is None or parsed.layout is not keys.Layout.DEEPSPEED:
            out[keys.unhide_expert_word(key)] = value
        elif not parsed.is_bank_param:  # user expert module: keep one module per expert
            out[keys.module_key(parsed.layer, parsed.expert, parsed.param)] = value
        else:
            bank = keys.bank_key(parsed.layer, parsed.param)
            groups[bank][parsed.expert] = value
            out.setdefault(bank, None)
    for key, by_id in groups.items():
        out[key] = torch.stack([by_id[i] for i in sorted(by_id)])
    return out
