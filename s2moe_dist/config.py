"""Dataclass configs. Every check raises ``ValueError`` naming the field, the value and what
is allowed, so a bad config fails before any process group or tensor exists."""
from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass
from typing import Any, Mapping, Optional

from .deepspeed_args import check_deepspeed_fields, normalize_noisy_gate_policy

ACTIVATIONS = ("relu", "gelu", "swiglu")
EVAL_MODES = ("clean", "noisy")
NOISY_ROUTING = ("own", "shared")
UNCERTAINTY_ON = ("input", "output")
GATES = ("learned", "fixed")  # fixed: y = 0.5 * clean + 0.5 * noisy (ablation, no gate parameters)
ROUTER_TYPES = ("topk", "xmoe", "stablemoe")  # s2moe_dist/moe/router_variants.py


def config_error(owner: str, name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{owner}.{name}={value!r} is invalid: {allowed}")


def check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise config_error(owner, name, value, f"must be an integer >= {minimum}")


def check_float(owner: str, name: str, value: Any, minimum: float = 0.0, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > minimum if strict else value >= minimum) and value == value  # NaN fails
    if not ok:
        cmp = ">" if strict else ">="
        raise config_error(owner, name, value, f"must be a number {cmp} {minimum}")


def check_choice(owner: str, name: str, value: Any, choices) -> None:
    if value not in choices:
        raise config_error(owner, name, value, f"must be one of {list(choices)}")


def from_mapping(cls, data: Optional[Mapping[str, Any]], owner: str, pass_owner: bool = False):
    """Build dataclass ``cls`` from a dict, refusing unknown keys by name; ``pass_owner``: give
    ``owner`` to the constructor too (configs whose checks name it, like ``S2MoEConfig``)."""
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{owner}: unknown field(s) {unknown}; known fields are {sorted(names)}")
    return cls(**data, owner=owner) if pass_owner else cls(**data)


@dataclass
class S2MoEConfig:
    """Configuration of one S2MoE layer (docs/design.md section 1).

    DeepSpeed ``MoE`` keywords keep their names and meaning; the S2MoE knobs follow them.
    DeepSpeed's calling conventions (positional order, its defaults for a call with an expert
    module, keywords accepted only to be refused) live in ``s2moe_dist/deepspeed_args.py``.
    The reference table in docs/layer.md is generated from the attribute list below
    (``python tools/config_reference.py --write``); a test fails when the two differ.

    ``owner`` (constructor only, not a field): the name errors give the config, e.g.
    ``model.moe`` for the run YAML's section, so a message names the full field path
    (``model.moe.k=0 is invalid: ...``); default ``S2MoEConfig``.

    Attributes:
        hidden_size: Model width d: the layer maps ``[..., d]`` to ``[..., d]``. Required: it is
            the surrounding model's width (in the run YAML, ``model.d_model``).
        num_experts: Number of experts E (global, over all expert-parallel ranks). Default 16:
            the paper's SMoE-family setting.
        k: Experts per token in training (top-k routing). Default 2: the paper trains top-2.
        ffn_hidden_size: Expert hidden size h; ``None`` means ``4 * hidden_size`` (the
            Transformer FFN convention).
        ep_size: Expert-parallel size: ranks the experts are split over; must divide ``num_experts``.
            ``ep_size > 1`` needs ``torch.distributed`` initialised before the layer is built.
            Default 1: every rank holds every expert, runs without a process group.
        activation: Expert activation: ``relu``, ``gelu`` (exact erf) or ``swiglu``
            (``silu(x W_gate) * (x W_up)``). Default ``gelu``: the paper's Transformer FFN.
        expert_bias: Expert biases ``b1``, ``b2`` (start at zero). Default off: the experts of
            DeepSpeed's and Megatron's MoE recipes are commonly bias-free.
        capacity_factor: With ``drop_tokens``: training capacity per expert and stream is
            ``max(ceil(T*k/E * capacity_factor), min_capacity)``. Default 1.0, DeepSpeed's.
        eval_capacity_factor: With ``drop_tokens``: the same factor at inference. Default 1.0,
            DeepSpeed's.
        min_capacity: With ``drop_tokens``: the smallest capacity per expert. Default 4,
            DeepSpeed's.
        drop_tokens: Capacity mode: slots over capacity are dropped, in DeepSpeed's priority (all
            first choices before any second choice, token order). Default ``False`` (DeepSpeed:
            ``True``): dropless, variable group sizes, nothing padded. A DeepSpeed-style call (an expert module
            passed) takes DeepSpeed's default, as for ``use_rts``, ``top2_2nd_expert_sampling``,
            ``num_experts`` and ``k``.
        use_rts: With ``drop_tokens``: random priority among first choices in training. Default
            ``False`` (DeepSpeed: ``True``): dropless routing has no priority to randomise.
        use_residual: PR-MoE (DeepSpeed's Residual MoE): a dense residual MLP mixed with the MoE
            output by a learned 2-way coefficient (``moe/residual.py``). Not with tensor parallelism.
            Default off, as in DeepSpeed.
        noisy_gate_policy: DeepSpeed's router noise in training: ``Jitter`` (input times
            U(0.99, 1.01)), ``RSample`` (top-1 choice from logits plus Gumbel noise; no effect at
            k >= 2) or ``None``; top-k router only (``moe/noisy_gate.py``). Default ``None``, as
            in DeepSpeed: S2MoE's own noise is the second stream.
        use_tutel: ``True`` raises ``ValueError`` (the dispatcher is dropless and sorted).
            Accepted so DeepSpeed calls passing ``use_tutel=False`` run unchanged.
        enable_expert_tensor_parallelism: Split each expert over the Megatron tensor-parallel
            group; ``True`` with no TP group registered raises ``ValueError`` naming the fix;
            ignored at TP size 1. Default off, as in DeepSpeed: whole experts per rank.
        top2_2nd_expert_sampling: At k=2 in training, draw the second expert with Gumbel noise;
            ignored at other k, as in DeepSpeed. Default ``False`` (DeepSpeed: ``True``): the
            paper's top-2 takes the two highest probabilities.
        moe_type: ``s2moe``, or ``smoe``: the same layer without noise and gate (the paper's
            SMoE baseline). Default ``s2moe``, the method.
        noise_mult_std: a: ``n1 ~ N(1, (a*sigma_x)^2)``; ``a = b = 0`` gives ``x_hat = x``.
            Default 1.0: the paper leaves a open; unit scale is its reading (docs/design.md 1.8).
            For a model served with one expert, ``a = b = 0.1`` did better on the quality benchmark
            (trained top-1, 4x budget, 3 seeds: k=1 BPC -0.015 to -0.023, k=2 within +-0.007, k=4
            worse; benchmarks/RESULTS.md, Quality); the default stays at the paper's reading.
        noise_add_std: b: ``n2 ~ N(0, (b*sigma_x)^2)``. Default 1.0, as ``noise_mult_std``.
        noise_add_mean: ``n2 ~ N(mu_x, (b*sigma_x)^2)``, the other reading of the paper.
            Default off: zero-mean additive noise keeps ``E[x_hat] = x``.
        noise_draws: Gaussian draws per hidden element: ``2`` (``x_hat = n1*x + n2``, the paper's
            form) or ``1`` (``x_hat = x + sigma_x*sqrt(a^2 x^2 + b^2)*eps``: the same distribution of
            ``x_hat`` with half the random numbers; its reparametrised gradient differs, both are
            unbiased). Stays ``2`` until the quality benchmark shows ``1`` trains no worse.
        noisy_routing: Route the noisy stream on ``x_hat`` (``own``) or reuse the clean routing
            (``shared``). Default ``own``: each stream is a full SMoE pass, as in the paper.
        uncertainty_on: InfoNCE on ``(x, x_hat)`` (``input``: its gradient reaches the layers that
            produced ``x``) or on ``(SMoE(x), SMoE(x_hat))`` (``output``: trains router and
            experts too). Default ``input``: the best reading of the paper (docs/design.md 1.6).
        gate: ``learned`` (``g = sigmoid(x W_g + b_g)``) or ``fixed`` (``g = 0.5``, no gate
            parameters: the no-gate ablation). Default ``learned``, the paper's gate.
        infonce_temperature: tau of InfoNCE. Default 0.1, as the authors' SimSMoE.
        infonce_max_tokens: Token sample size bounding InfoNCE's N x N logits. Default 1024:
            bounded memory (a 1024 x 1024 product per layer) whatever the batch.
        balance_coef: alpha: weight of the balance loss in ``aux_loss()`` / ``s2moe_aux_loss``.
            Default 0.01, the authors' SMoE baselines.
        uncertainty_coef: beta: weight of the InfoNCE loss in ``aux_loss()`` / ``s2moe_aux_loss``.
            Default 0.1: the paper leaves beta open (docs/design.md 1.8).
        eval_mode: Inference: ``clean`` (one stream, no noise) or ``noisy`` (the training
            computation, seeded). Default ``clean``: one stream is the paper's inference saving.
        eval_k: Experts per token at inference; ``None`` means ``k`` (the routing the layer
            trained with); ``forward(x, k=...)`` overrides it per call.
        eval_seed: Noise seed of ``eval_mode="noisy"``. Default 1234: any fixed seed makes
            noisy evaluation reproducible.
        router_type: ``topk``, or the paper's router baselines ``xmoe`` (Chi et al. 2022) and
            ``stablemoe`` (Dai et al. 2022); works with either ``moe_type``. Default ``topk``,
            the router of S2MoE and DeepSpeed.
        router_dim: ``xmoe``: dimension tokens are projected to for routing. Default 16, the
            X-MoE paper's.
        router_temperature: ``xmoe``: initial (learnable) temperature. Default 0.07, the X-MoE
            paper's initial value.
        freeze_router_after: ``stablemoe``: training forwards before the router is frozen
            (stage 2); ``None``: never (one-stage training, the router keeps learning).
    """

    hidden_size: int
    num_experts: int = 16
    k: int = 2
    ffn_hidden_size: Optional[int] = None
    ep_size: int = 1
    activation: str = "gelu"
    expert_bias: bool = False
    # DeepSpeed MoE keywords
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = False
    use_rts: bool = False
    use_residual: bool = False
    noisy_gate_policy: Optional[str] = None
    use_tutel: bool = False
    enable_expert_tensor_parallelism: bool = False
    top2_2nd_expert_sampling: bool = False
    # S2MoE knobs
    moe_type: str = "s2moe"
    noise_mult_std: float = 1.0
    noise_add_std: float = 1.0
    noise_add_mean: bool = False
    noise_draws: int = 2
    noisy_routing: str = "own"
    uncertainty_on: str = "input"
    gate: str = "learned"
    infonce_temperature: float = 0.1
    infonce_max_tokens: int = 1024
    balance_coef: float = 0.01
    uncertainty_coef: float = 0.1
    eval_mode: str = "clean"
    eval_k: Optional[int] = None
    eval_seed: int = 1234
    # router baselines (moe/router_variants.py), with either moe_type
    router_type: str = "topk"
    router_dim: int = 16
    router_temperature: float = 0.07
    freeze_router_after: Optional[int] = None
    owner: InitVar[str] = "S2MoEConfig"

    def __post_init__(self, owner: str) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size if isinstance(self.hidden_size, int) else None
        if self.eval_k is None:
            self.eval_k = self.k
        self.validate(owner)

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]], owner: str = "S2MoEConfig", **fields) -> "S2MoEConfig":
        """Build from a mapping of fields (a YAML section), unknown keys refused by name; errors
        name ``owner`` (e.g. ``model.moe``). ``fields`` are set besides ``data`` (e.g. hidden_size)."""
        return from_mapping(cls, {**fields, **dict(data or {})}, owner, pass_owner=True)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def renormalize(self) -> bool:
        """Top-k weights renormalised for layers trained with k >= 2; raw top-1 prob for k = 1."""
        return self.k >= 2

    def validate(self, owner: str = "S2MoEConfig") -> None:
        """Raise ValueError naming ``owner.field``, the value and what is allowed."""
        o = owner
        check_int(o, "hidden_size", self.hidden_size, 1)
        check_int(o, "num_experts", self.num_experts, 1)
        check_int(o, "ffn_hidden_size", self.ffn_hidden_size, 1)
        check_int(o, "ep_size", self.ep_size, 1)
        check_int(o, "k", self.k, 1)
        if self.k > self.num_experts:
            raise config_error(o, "k", self.k, f"must be <= num_experts ({self.num_experts})")
        check_int(o, "eval_k", self.eval_k, 1)
        if self.eval_k > self.num_experts:
            raise config_error(o, "eval_k", self.eval_k, f"must be <= num_experts ({self.num_experts})")
        if self.num_experts % self.ep_size:
            raise config_error(o, "num_experts", self.num_experts,
                               f"must be divisible by ep_size ({self.ep_size}); pick ep_size among "
                               f"{[d for d in range(1, self.num_experts + 1) if self.num_experts % d == 0]}")
        check_choice(o, "activation", self.activation, ACTIVATIONS)
        check_choice(o, "moe_type", self.moe_type, ("s2moe", "smoe"))
        check_choice(o, "eval_mode", self.eval_mode, EVAL_MODES)
        check_choice(o, "noisy_routing", self.noisy_routing, NOISY_ROUTING)
        check_choice(o, "uncertainty_on", self.uncertainty_on, UNCERTAINTY_ON)
        check_choice(o, "gate", self.gate, GATES)
        check_choice(o, "router_type", self.router_type, ROUTER_TYPES)
        check_int(o, "router_dim", self.router_dim, 1)
        check_float(o, "router_temperature", self.router_temperature, strict=True)
        if self.freeze_router_after is not None:
            check_int(o, "freeze_router_after", self.freeze_router_after, 0)
            if self.router_type != "stablemoe":
                raise config_error(o, "freeze_router_after", self.freeze_router_after,
                                   f"only StableMoE's two-stage routing uses it (router_type='stablemoe', "
                                   f"got router_type={self.router_type!r}); leave it None")
        check_float(o, "noise_mult_std", self.noise_mult_std)
        check_float(o, "noise_add_std", self.noise_add_std)
        if isinstance(self.noise_draws, bool) or self.noise_draws not in (1, 2):
            raise config_error(o, "noise_draws", self.noise_draws, "must be 1 or 2 (Gaussian draws per element)")
        check_float(o, "infonce_temperature", self.infonce_temperature, strict=True)
        check_int(o, "infonce_max_tokens", self.infonce_max_tokens, 2)
        check_float(o, "balance_coef", self.balance_coef)
        check_float(o, "uncertainty_coef", self.uncertainty_coef)
        check_float(o, "capacity_factor", self.capacity_factor, strict=True)
        check_float(o, "eval_capacity_factor", self.eval_capacity_factor, strict=True)
        check_int(o, "min_capacity", self.min_capacity, 0)
        self.noisy_gate_policy = normalize_noisy_gate_policy(self.noisy_gate_policy)
        check_deepspeed_fields(o, {"use_tutel": self.use_tutel, "noisy_gate_policy": self.noisy_gate_policy})
        if self.noisy_gate_policy is not None and self.router_type != "topk":
            raise config_error(o, "noisy_gate_policy", self.noisy_gate_policy,
                               f"DeepSpeed's noisy gate acts on the top-k router only (router_type='topk', "
                               f"got router_type={self.router_type!r}); set noisy_gate_policy=None")
        # top2_2nd_expert_sampling acts only at k=2 and is ignored otherwise, as in DeepSpeed, whose
        # default (and Megatron-DeepSpeed's, with topk=1) is True: refusing it would break drop-in use.


def moe_config_from_dict(data: Mapping[str, Any], owner: str = "S2MoEConfig") -> S2MoEConfig:
    return S2MoEConfig.from_dict(data, owner)
