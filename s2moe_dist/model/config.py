"""``ModelConfig``: the character LM's shape. Every check names the field (``model.<field>``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from ..config import S2MoEConfig, check_choice, check_float, check_int, config_error, from_mapping

POS_ENCODINGS = ("learned", "rotary")
DENSE_ACTIVATIONS = ("relu", "gelu")
OWNER = "model"


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise config_error(owner, name, value, "must be true or false")


@dataclass
class ModelConfig:
    """Decoder-only character LM: pre-LN blocks, causal attention, S2MoE FFN every ``moe_every``.

    ``moe`` is the S2MoE layer's ``S2MoEConfig`` (``hidden_size = d_model``), built and validated
    once, when the config is: given as a mapping of its fields without ``hidden_size`` (the YAML
    section, e.g. ``{num_experts: 16, k: 2, ffn_hidden_size: 512, moe_type: smoe}``) or as an
    ``S2MoEConfig``; its errors name ``model.moe.<field>``. ``to_dict()`` writes it back as such
    a mapping. The ``model:`` table in docs/training.md is generated from the attribute list below.

    Attributes:
        vocab_size: Vocabulary size; ``None``: taken from the data set when the model is built.
        seq_len: Sequence length (characters per window).
        n_layers: Transformer blocks.
        d_model: Model width (the S2MoE layers' ``hidden_size``).
        n_heads: Attention heads; must divide ``d_model``.
        d_ff: Hidden size of the dense MLP blocks; ``None`` means ``4 * d_model``.
        dropout: Dropout probability (attention and residual stream).
        activation: Dense MLP activation (``relu``, ``gelu``, ``swiglu``).
        pos_encoding: ``learned`` or ``rotary`` positions.
        rotary_base: Base of the rotary frequencies.
        tie_embeddings: LM head shares the embedding matrix.
        moe_every: Block i has an S2MoE FFN when ``(i + 1) % moe_every == 0``, a dense MLP
            otherwise; 0: no MoE.
        moe: The S2MoE layer's config (docs/layer.md#config-reference); in YAML its fields
            without ``hidden_size``.
        tp_size: Megatron tensor parallelism of attention and dense MLPs (world = TP x DP).
    """

    vocab_size: Optional[int] = None  # None: taken from the data set when the model is built
    seq_len: int = 128
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_ff: Optional[int] = None  # hidden size of the dense MLP layers; default 4 * d_model
    dropout: float = 0.0
    activation: str = "gelu"  # dense MLP activation
    pos_encoding: str = "learned"
    rotary_base: float = 10000.0
    tie_embeddings: bool = True
    moe_every: int = 1  # block i has an S2MoE FFN when (i + 1) % moe_every == 0; 0: no MoE
    moe: S2MoEConfig = field(default_factory=dict)  # a mapping of its fields is converted on validation
    tp_size: int = 1  # Megatron tensor parallelism of attention and dense MLPs (world = TP x DP)

    def __post_init__(self) -> None:
        if self.d_ff is None and isinstance(self.d_model, int):
            self.d_ff = 4 * self.d_model
        self.validate()

    def validate(self) -> None:
        o = OWNER
        if self.vocab_size is not None:
            check_int(o, "vocab_size", self.vocab_size, 2)
        check_int(o, "seq_len", self.seq_len, 1)
        check_int(o, "n_layers", self.n_layers, 1)
        check_int(o, "d_model", self.d_model, 1)
        check_int(o, "n_heads", self.n_heads, 1)
        check_int(o, "d_ff", self.d_ff, 1)
        if self.d_model % self.n_heads:
            raise config_error(o, "n_heads", self.n_heads,
                               f"must divide d_model ({self.d_model}); e.g. n_heads in "
                               f"{[h for h in range(1, min(self.d_model, 32) + 1) if self.d_model % h == 0]}")
        check_float(o, "dropout", self.dropout)
        if self.dropout >= 1:
            raise config_error(o, "dropout", self.dropout, "must be in [0, 1)")
        check_choice(o, "activation", self.activation, DENSE_ACTIVATIONS)
        check_choice(o, "pos_encoding", self.pos_encoding, POS_ENCODINGS)
        if self.pos_encoding == "rotary" and self.head_dim % 2:
            raise config_error(o, "pos_encoding", "rotary",
                               f"needs an even head size (d_model / n_heads = {self.head_dim}); "
                               "change n_heads or use pos_encoding=learned")
        check_float(o, "rotary_base", self.rotary_base, strict=True)
        check_bool(o, "tie_embeddings", self.tie_embeddings)
        check_int(o, "moe_every", self.moe_every, 0)
        self.moe = self._layer_config(self.moe)  # validated now, before anything is built
        self._validate_tensor_parallel(self.moe)

    def _layer_config(self, moe) -> S2MoEConfig:
        """``moe`` (a mapping of S2MoEConfig fields, or an S2MoEConfig) as the validated layer config."""
        owner = f"{OWNER}.moe"
        if isinstance(moe, S2MoEConfig):
            if moe.hidden_size != self.d_model:
                raise config_error(owner, "hidden_size", moe.hidden_size,
                                   f"is set by model.d_model ({self.d_model}); build it with hidden_size=d_model")
            moe.validate(owner)
            return moe
        if not isinstance(moe, Mapping):
            raise config_error(OWNER, "moe", moe, "must be a mapping of S2MoEConfig fields")
        if "hidden_size" in moe:
            raise config_error(owner, "hidden_size", moe["hidden_size"],
                               "is set by model.d_model; remove it from model.moe")
        return S2MoEConfig.from_dict(moe, owner, hidden_size=self.d_model)

    def _validate_tensor_parallel(self, moe: S2MoEConfig) -> None:
        """Shapes that must split over ``tp_size`` (the world-size checks are the trainer's)."""
        o, tp = OWNER, self.tp_size
        check_int(o, "tp_size", tp, 1)
        if tp == 1:
            return
        fix = "choose a model.tp_size that divides it, or change the field"
        if self.d_model % tp:
            raise config_error(o, "d_model", self.d_model, f"must be divisible by model.tp_size ({tp}) for the "
                               f"tensor-parallel layers; {fix}")
        if self.n_heads % tp:
            raise config_error(o, "n_heads", self.n_heads, f"must be divisible by model.tp_size ({tp}): attention "
                               f"heads are split over tensor-parallel ranks; {fix}")
        has_dense = any(not self.is_moe_block(i) for i in range(self.n_layers))
        if has_dense and self.d_ff % tp:
            raise config_error(o, "d_ff", self.d_ff, f"must be divisible by model.tp_size ({tp}) for the "
                               f"tensor-parallel dense MLPs; {fix}")
        if any(self.is_moe_block(i) for i in range(self.n_layers)) and moe.enable_expert_tensor_parallelism \
                and moe.ffn_hidden_size % tp:
            raise config_error(o, "moe.ffn_hidden_size", moe.ffn_hidden_size,
                               f"must be divisible by model.tp_size ({tp}) to split each expert over TP "
                               f"(model.moe.enable_expert_tensor_parallelism); {fix}, or set "
                               "enable_expert_tensor_parallelism false")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_block(self, i: int) -> bool:
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    @property
    def moe_blocks(self):
        return [i for i in range(self.n_layers) if self.is_moe_block(i)]

    def moe_config(self, **overrides) -> S2MoEConfig:
        """``self.moe``, or a copy with ``overrides`` (validated, errors naming ``model.moe``).
        Kept for callers of the former dict-valued ``moe``; read ``self.moe`` instead."""
        return dataclasses.replace(self.moe, owner=f"{OWNER}.moe", **overrides) if overrides else self.moe

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (the run's config.yaml / checkpoint form): ``moe`` without ``hidden_size``."""
        out = dataclasses.asdict(self)
        out["moe"].pop("hidden_size", None)
        return out


def model_config_from_dict(data) -> ModelConfig:
    return from_mapping(ModelConfig, data, OWNER)


def saved_moe_fields(model: Mapping[str, Any]) -> Dict[str, Any]:
    """The full ``moe`` fields of a saved ``model`` dict (``ModelConfig.to_dict()``, or an older
    partial one: fields it left out take their defaults), for comparing a checkpoint's model
    with a run's. The saved mapping as it is if it no longer validates."""
    try:
        return model_config_from_dict(model).to_dict()["moe"]
    except (TypeError, ValueError):
        return dict(model.get("moe") or {})
