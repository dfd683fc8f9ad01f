"""Decoder-only character LM: embeddings, pre-LN blocks, final LN, (tied) LM head.

Block i's FFN is an S2MoE layer when ``config.is_moe_block(i)`` (``moe_type`` s2moe or smoe,
the same layer either way), a dense MLP otherwise. ``forward(idx)`` returns logits; the MoE
auxiliary losses are read from the layers afterwards (``lm_loss``).

The S2MoE layer class is an explicit constructor argument (``CharLM(config, moe_layer_cls=...)``),
the pure ``S2MoELayer`` by default, so the model's state-dict keys never depend on whether
DeepSpeed is installed; the trainer passes ``integrations.deepspeed.DeepSpeedS2MoE``, the class
DeepSpeed's engine must see.
"""
from __future__ import annotations

import math
import copy
from typing import List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ..config import S2MoEConfig
from ..moe.layer import S2MoELayer
from .attention import CausalSelfAttention, Rotary
from .config import ModelConfig
from .linear import init_linear_, linear_tp_size, make_linear


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str, dropout: float):
        super().__init__()
        self.fc1 = make_linear(d_model, d_ff, bias=True, parallel="column")
        self.fc2 = make_linear(d_ff, d_model, bias=True, parallel="row")
        self.fc2.residual_projection = True
        self.act = F.gelu if activation == "gelu" else F.relu
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class MoEFFN(nn.Module):
    """Wraps an S2MoE layer of class ``layer_cls`` (``S2MoELayer`` or a subclass) to return just
    the hidden states; the layer keeps its losses and stats for ``lm_loss``."""

    def __init__(self, config: ModelConfig, layer_config: S2MoEConfig, layer_cls: Type[S2MoELayer]):
        super().__init__()
        # each layer its own copy: one layer's config edits (e.g. eval_k) stay in that layer
        self.moe = layer_cls(config=copy.copy(layer_config))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.moe(x)
        return self.drop(out[0] if isinstance(out, tuple) else out)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int, rotary: Optional[Rotary],
                 layer_config: Optional[S2MoEConfig] = None, layer_cls: Type[S2MoELayer] = S2MoELayer):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config.d_model, config.n_heads, config.dropout, rotary)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.is_moe = config.is_moe_block(index)
        self.ffn = (MoEFFN(config, layer_config, layer_cls) if self.is_moe else
                    MLP(config.d_model, config.d_ff, config.activation, config.dropout))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.ffn(self.ln2(x))


class CharLM(nn.Module):
    """``moe_layer_cls``: the class of the S2MoE layers (``S2MoELayer`` or a subclass, e.g.
    ``integrations.deepspeed.DeepSpeedS2MoE`` under DeepSpeed's engine); ``None``: ``S2MoELayer``."""

    def __init__(self, config: ModelConfig, moe_layer_cls: Optional[Type[S2MoELayer]] = None):
        super().__init__()
        moe_layer_cls = S2MoELayer if moe_layer_cls is None else moe_layer_cls
        if not (isinstance(moe_layer_cls, type) and issubclass(moe_layer_cls, S2MoELayer)):
            raise ValueError(f"CharLM(moe_layer_cls={moe_layer_cls!r}) is invalid: must be S2MoELayer or a "
                             "subclass (e.g. s2moe_dist.integrations.deepspeed.DeepSpeedS2MoE)")
        if config.vocab_size is None:
            raise ValueError("model.vocab_size=None is invalid: set it, or let the trainer take it from "
                             "the data set before building the model")
        if config.tp_size != linear_tp_size():
            raise ValueError(f"model.tp_size={config.tp_size} is invalid here: the dense-layer factory builds "
                             f"layers for TP={linear_tp_size()}. Under tensor parallelism call "
                             "s2moe_dist.train.distributed.init_model_parallel(tp_size) (or install "
                             "integrations.megatron_linear.MegatronLinearFactory with model.set_linear_factory) "
                             "before building the model; on one process set model.tp_size=1")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model) if config.pos_encoding == "learned" else None
        rotary = (Rotary(config.head_dim, config.seq_len, config.rotary_base)
                  if config.pos_encoding == "rotary" else None)
        self.drop = nn.Dropout(config.dropout)
        # experts split over TP only when there is TP: the same config runs at model.tp_size 1
        layer_config = config.moe
        if config.tp_size == 1 and layer_config.enable_expert_tensor_parallelism:
            layer_config = config.moe_config(enable_expert_tensor_parallelism=False)
        self.blocks = nn.ModuleList([Block(config, i, rotary, layer_config, moe_layer_cls)
                                     for i in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = make_linear(config.d_model, config.vocab_size, bias=False, parallel=None)
        self._init_weights()
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers). S2MoE
        layers keep their own init (experts: per global expert, EP-size independent)."""
        std_res = 0.02 / math.sqrt(2 * self.config.n_layers)
        in_moe = {id(sub) for m in self.modules() if isinstance(m, S2MoELayer) for sub in m.modules()}
        for m in self.modules():
            if id(m) in in_moe:  # the layer's router/gate keep the layer's own init
                continue
            # dense linears are drawn at full size whatever their TP shard (TP-size independent)
            if init_linear_(m, std_res if getattr(m, "residual_projection", False) else 0.02):
                continue
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def moe_layers(self) -> List[Tuple[int, S2MoELayer]]:
        """(block index, S2MoE layer) for every MoE block, in order. The pure PyTorch layer
        (which holds ``stats``, ``config``), inside DeepSpeed's wrapper if there is one."""
        return [(i, next(m for m in b.ffn.modules() if isinstance(m, S2MoELayer)))
                for i, b in enumerate(self.blocks) if b.is_moe]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.config.seq_len:
            raise ValueError(f"input length {T} exceeds model.seq_len={self.config.seq_len}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
