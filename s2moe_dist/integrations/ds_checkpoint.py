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
another (see ``reshard.py`` for the optimizer state). No DeepSpeed import here.
"""
from __future__ import annotations

import re
from collections import OrderedDict, defaultdict
from typing import Dict, MutableMapping

import torch

from ..moe.experts import ExpertBank

DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts."
_SPLIT_KEY = re.compile(r"^(\d+)\.(.+)$")


def _replace_items(state_dict: MutableMapping, new_items) -> None:
    """Rewrite ``state_dict`` in place with ``new_items`` (keeps key order readable)."""
    state_dict.clear()
    state_dict.update(new_items)


def split_expert_state(module, state_dict, prefix, local_metadata) -> None:
    """``state_dict`` post-hook of a DeepSpeed S2MoE layer: batched bank -> one key per local expert."""
    bank = prefix + "experts."
    out = prefix + DS_EXPERTS
    is_bank = isinstance(module.experts, ExpertBank)
    items = []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            items.append((key, value))
        elif not key.startswith(bank):  # hide "expert" from DeepSpeed's expert-key filter
            items.append((prefix + key[len(prefix):].replace("expert", "Expert"), value))
        elif is_bank:  # experts.w1 -> <i>.w1
            name = key[len(bank):]
            items.extend((f"{out}{i}.{name}", value[i]) for i in range(value.shape[0]))
        else:  # experts.experts.<i>.<path> -> <i>.<path>
            items.append((out + key[len(bank + "experts."):], value))
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
    src = prefix + DS_EXPERTS
    bank = prefix + "experts."
    is_bank = isinstance(module.experts, ExpertBank)
    for key in [k for k in state_dict if k.startswith(prefix) and "Expert" in k[len(prefix):]]:
        state_dict[prefix + key[len(prefix):].replace("Expert", "expert")] = state_dict.pop(key)
    try:
        per_expert: Dict[str, Dict[int, torch.Tensor]] = defaultdict(dict)
        for key in [k for k in state_dict if k.startswith(src)]:
            m = _SPLIT_KEY.match(key[len(src):])
            if m is None:
                continue
            per_expert[m.group(2)][int(m.group(1))] = state_dict.pop(key)
        for name, by_id in per_expert.items():
            keep = _expert_block(module, by_id.keys(), prefix + "experts." + name)
            if is_bank:
                state_dict[bank + name] = torch.stack([by_id[i] for i in keep])
            else:
                for local, i in enumerate(keep):
                    state_dict[f"{bank}experts.{local}.{name}"] = by_id[i]
        if is_bank:  # a batched bank holding all experts (single-process checkpoint)
            for name, p in module.experts.named_parameters(recurse=False):
                t = state_dict.get(bank + name)
                if t is not None and t.shape[0] != p.shape[0]:
                    keep = _expert_block(module, range(t.shape[0]), bank + name)
                    state_dict[bank + name] = t[keep[0]:keep[-1] + 1]
    except ValueError as e:
        error_msgs.append(str(e))


def batched_expert_state_dict(state_dict: MutableMapping) -> "OrderedDict[str, torch.Tensor]":
    """Convert a state dict in DeepSpeed's per-expert layout into S2MoE's batched layout
    (``<layer>.experts.w1`` [E, d, h], ...), e.g. to load a DeepSpeed-trained model into the pure
    PyTorch ``S2MoELayer``. Expert ids are stacked in increasing order."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    groups: Dict[str, Dict[int, torch.Tensor]] = defaultdict(dict)
    for key, value in state_dict.items():
        pos = key.find(DS_EXPERTS)
        if pos < 0:
            out[key.replace("Expert", "expert")] = value
            continue
        m = _SPLIT_KEY.match(key[pos + len(DS_EXPERTS):])
        prefix, i, name = key[:pos], int(m.group(1)), m.group(2)
        if "." in name:  # user expert module: keep one module per expert
            out[f"{prefix}experts.experts.{i}.{name}"] = value
        else:
            groups[prefix + "experts." + name][i] = value
            out.setdefault(prefix + "experts." + name, None)
    for key, by_id in groups.items():
        out[key] = torch.stack([by_id[i] for i in sorted(by_id)])
    return out
