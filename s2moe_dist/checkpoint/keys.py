"""The expert parameter naming scheme, in one place: every module that builds or reads an expert
key or a DeepSpeed checkpoint file name does it through this module.

Key layouts of one S2MoE layer at prefix ``<layer>`` ("" or ending in "."):

- ``Layout.BANK``: ``<layer>experts.<w1|b1|w2|b2>``, the layer's batched bank, all local experts
  in dim 0 ([E_local, ...]); ``Layout.OWN`` is an ``ExpertBank``'s own state dict (``w1``, ...).
- ``Layout.MODULE``: ``<layer>experts.experts.<local id>.<path>``, a user expert module per expert.
- ``Layout.DEEPSPEED``: ``<layer>deepspeed_moe.experts.deepspeed_experts.<id>.<param>``,
  DeepSpeed-MoE's per-expert keys (``<param>``: w1|b1|w2|b2 for a bank, else a module path). The
  layer's state dict numbers them by LOCAL id; DeepSpeed renumbers them to GLOBAL ids in its
  files; the EP-independent (canonical) optimizer state of the resharder uses global ids too.

DeepSpeed file names of a checkpoint tag folder (``<tp>``: the tensor-parallel rank, two digits):
``mp_rank_<tp>_model_states.pt`` (dense weights), ``layer_<l>_expert_<g>_mp_rank_<tp>_model_states.pt``
(one per MoE layer and GLOBAL expert g, one per TP rank when experts are split over TP),
``expp_rank_<e>_mp_rank_00_optim_states.pt`` (ZeRO-0, one per EP rank) and
``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` (ZeRO-1/2, one per data-parallel rank);
expert optimizer param groups are named ``ep_size_<n>``.

DeepSpeed takes every key of an MoE layer containing "expert" for an expert weight, so the layer's
other keys with that word are written with a capital E (``hide_expert_word``).

Pure string handling: nothing here imports torch, DeepSpeed or the training code (``moe`` uses it).
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace
from typing import List, NamedTuple, Optional, Tuple

BANK_PARAMS = ("w1", "b1", "w2", "b2")
BANK = "experts."  # <layer>experts.w1
MODULES = "experts.experts."  # <layer>experts.experts.<i>.<path>
DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts."  # <layer>deepspeed_moe.experts.deepspeed_experts.<i>.<p>


class ExpertKeyError(ValueError):
    """A key in an expert namespace that does not follow the scheme."""


class Layout(enum.Enum):
    BANK = "bank"
    OWN = "own"
    MODULE = "module"
    DEEPSPEED = "deepspeed"


@dataclass(frozen=True)
class ExpertKey:
    """One parsed expert key. ``expert``: None for a bank (every local expert in dim 0), else the id
    written in the key (local in a layer's state dict, global in DeepSpeed's files)."""
    layer: str
    layout: Layout
    param: str
    expert: Optional[int] = None

    @property
    def name(self) -> str:
        if self.layout is Layout.BANK:
            return bank_key(self.layer, self.param)
        if self.layout is Layout.OWN:
            return self.param
        if self.layout is Layout.MODULE:
            return module_key(self.layer, self.expert, self.param)
        return deepspeed_key(self.layer, self.expert, self.param)

    @property
    def is_bank_param(self) -> bool:
        """A tensor of the built-in bank (w1, b1, w2, b2), not of a user expert module."""
        return self.layout in (Layout.BANK, Layout.OWN) or (self.layout is Layout.DEEPSPEED
                                                              and self.param in BANK_PARAMS)

    def sibling(self, param: str) -> str:
        """The key of tensor ``param`` of the same expert(s)."""
        return replace(self, param=param).name


def bank_key(layer: str, param: str) -> str:
    return f"{layer}{BANK}{param}"


def module_key(layer: str, expert: int, path: str) -> str:
    return f"{layer}{MODULES}{expert}.{path}"


def deepspeed_key(layer: str, expert: int, param: str) -> str:
    return f"{layer}{DS_EXPERTS}{expert}.{param}"


# the layer prefix is a module path: empty or ending in "."; the first expert namespace wins
_DEEPSPEED = re.compile(r"^(?P<layer>(?:.*?\.)?)deepspeed_moe\.experts\.deepspeed_experts\.(?P<id>\d+)\.(?P<param>.+)$")
_MODULE = re.compile(r"^(?P<layer>(?:.*?\.)?)experts\.experts\.(?P<id>\d+)\.(?P<param>.+)$")
_BANK = re.compile(r"^(?P<layer>(?:.*\.)?)experts\.(?P<param>w1|b1|w2|b2)$")
_IN_MODULES = re.compile(r"(?:^|\.)experts\.experts\.")


def parse_expert_key(key: str) -> Optional[ExpertKey]:
    """The expert key ``key`` parsed, or None if it is no expert key (dense weights, router, other
    frameworks' experts). A key inside the DeepSpeed or module namespace that does not follow the
    scheme raises ``ExpertKeyError``."""
    if DS_EXPERTS in key:
        m = _DEEPSPEED.match(key)
        if m is None:
            raise ExpertKeyError(f"expert key {key!r} is malformed: expected "
                                 f"<layer>.{DS_EXPERTS}<expert id>.<param>")
        return ExpertKey(m.group("layer"), Layout.DEEPSPEED, m.group("param"), int(m.group("id")))
    if _IN_MODULES.search(key):
        m = _MODULE.match(key)
        if m is None:
            raise ExpertKeyError(f"expert key {key!r} is malformed: expected <layer>.{MODULES}<local id>.<path>")
        return ExpertKey(m.group("layer"), Layout.MODULE, m.group("param"), int(m.group("id")))
    m = _BANK.match(key)
    if m:
        return ExpertKey(m.group("layer"), Layout.BANK, m.group("param"))
    return None


def parse_bank_tensor_key(key: str) -> Optional[ExpertKey]:
    """A key of a bank tensor (w1, b1, w2, b2) in any layout: the layer's bank, DeepSpeed's
    per-expert keys, or an ``ExpertBank``'s own state dict (``w1``). None for anything else."""
    if key in BANK_PARAMS:
        return ExpertKey("", Layout.OWN, key)
    parsed = parse_expert_key(key)
    return parsed if parsed is not None and parsed.is_bank_param and parsed.layout is not Layout.MODULE else None


def is_bank_key(name: str) -> bool:
    """``<layer>experts.<w1|b1|w2|b2>``: a parameter of the built-in bank ([E_local, ...])."""
    return _BANK.match(name) is not None


def is_bank_bias(name: str) -> bool:
    """``<layer>experts.b1`` / ``b2``: a bias of the built-in bank ([E_local, ...], no weight decay)."""
    m = _BANK.match(name)
    return m is not None and m.group("param") in ("b1", "b2")


def to_deepspeed(key: ExpertKey, first_expert: int, n_local: int) -> List[Tuple[str, Optional[int]]]:
    """A layer's expert parameter -> [(DeepSpeed key with GLOBAL expert id, index into dim 0 or None)].

    Bank ``<l>experts.w1`` [E_local, ...] -> ``<l>deepspeed_moe...deepspeed_experts.<g>.w1`` for
    g = first_expert + i (index i); a module expert ``<l>experts.experts.<i>.<path>`` -> one key
    with g = first_expert + i (index None: the whole tensor)."""
    if key.layout is Layout.MODULE:
        return [(deepspeed_key(key.layer, first_expert + key.expert, key.param), None)]
    if key.layout is Layout.BANK:
        return [(deepspeed_key(key.layer, first_expert + i, key.param), i) for i in range(n_local)]
    raise ExpertKeyError(f"{key.name!r} is not a layer's expert parameter (<layer>.experts.w1|w2|b1|b2 or "
                         f"<layer>.{MODULES}<i>.<...>)")


def hide_expert_word(rel_key: str) -> str:
    """A layer key (relative to the layer) that is no expert weight, as written for DeepSpeed."""
    return rel_key.replace("expert", "Expert")


def unhide_expert_word(rel_key: str) -> str:
    return rel_key.replace("Expert", "expert")


def has_hidden_expert_word(rel_key: str) -> bool:
    return "Expert" in rel_key


# ---- DeepSpeed file names ------------------------------------------------------------------------
class ExpertFile(NamedTuple):
    layer: int  # MoE layer index (DeepSpeed's count of MoE layers)
    expert: int  # global expert id
    tp_rank: int


def model_file(tp_rank: int = 0) -> str:
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def expert_file(layer: int, expert: int, tp_rank: int = 0) -> str:
    return f"layer_{layer}_expert_{expert}_mp_rank_{tp_rank:02d}_model_states.pt"


def zero0_optim_file(ep_rank: int) -> str:
    return f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt"


def zero12_optim_file(dp_rank: int, bf16: bool = False) -> str:
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp_rank}_mp_rank_00_optim_states.pt"


def ep_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


_EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_ZERO0 = re.compile(r"^expp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_ZERO12 = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_EP_GROUP = re.compile(r"^ep_size_(\d+)$")


def parse_expert_file(name: str) -> Optional[ExpertFile]:
    """(layer, global expert, TP rank) of a DeepSpeed expert file name, None for other files."""
    m = _EXPERT_FILE.match(name)
    return ExpertFile(*map(int, m.groups())) if m else None


def parse_zero0_optim_file(name: str) -> Optional[int]:
    """The EP rank of a ZeRO-0 optimizer file, None for other files."""
    m = _ZERO0.match(name)
    return int(m.group(1)) if m else None


def parse_zero12_optim_file(name: str) -> Optional[int]:
    """The data-parallel rank of a ZeRO-1/2 optimizer file, None for other files."""
    m = _ZERO12.match(name)
    return int(m.group(1)) if m else None


def parse_ep_group_name(name: str) -> int:
    m = _EP_GROUP.match(name or "")
    if m is None:
        raise ExpertKeyError(f"expert param group name {name!r} is malformed: expected ep_size_<n>")
    return int(m.group(1))
