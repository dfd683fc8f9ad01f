"""Dataclass configs. Every check raises ``ValueError`` naming the field, the value and what
is allowed, so a bad config fails before any process group or tensor exists."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

ACTIVATIONS = ("relu", "gelu", "swiglu")
EVAL_MODES = ("clean", "noisy")
NOISY_ROUTING = ("own", "shared")
UNCERTAINTY_ON = ("input", "output")
GATES = ("learned", "fixed")  # fixed: y = 0.5 * clean + 0.5 * noisy (ablation, no gate parameters)
ROUTER_TYPES = ("topk", "xmoe", "stablemoe")  # s2moe_dist/moe/router_variants.py
NOISY_GATE_POLICIES = (None, "Jitter", "RSample")


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


def from_mapping(cls, data: Optional[Mapping[str, Any]], owner: str):
    """Build dataclass ``cls`` from a dict, refusing unknown keys by name."""
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{owner}: unknown field(s) {unknown}; known fields are {sorted(names)}")
    return cls(**data)


@dataclass
class S2MoEConfig:
    """Configuration of one S2MoE layer (docs/design.md section 1).

    DeepSpeed ``MoE`` keywords keep their names and meaning; the S2MoE knobs follow them.
    The reference table in docs/layer.md is generated from the attribute list below
    (``python tools/config_reference.py --write``); a test fails when the two differ.

    Attributes:
        hidden_size: Model width d: the layer maps ``[..., d]`` to ``[..., d]``.
        num_experts: Number of experts E (global, over all expert-parallel ranks).
        k: Experts per token in training (top-k routing).
        ffn_hidden_size: Expert hidden size h; ``None`` means ``4 * hidden_size``.
        ep_size: Expert-parallel size: ranks the experts are split over; must divide ``num_experts``.
            ``ep_size > 1`` needs ``torch.distributed`` initialised before the layer is built.
        activation: Expert activation: ``relu``, ``gelu`` (exact erf) or ``swiglu``
            (``silu(x W_gate) * (x W_up)``).
        expert_bias: Expert biases ``b1``, ``b2`` (start at zero).
        capacity_factor: With ``drop_tokens``: training capacity per expert and stream is
            ``max(ceil(T*k/E * capacity_factor), min_capacity)``.
        eval_capacity_factor: With ``drop_tokens``: the same factor at inference.
        min_capacity: With ``drop_tokens``: the smallest capacity per expert.
        drop_tokens: Capacity mode: slots over capacity are dropped, in DeepSpeed's priority (all
            first choices before any second choice, token order). Default ``False`` (DeepSpeed:
            ``True``): dropless, variable group sizes, nothing padded. A DeepSpeed-style call (an expert module
            passed) takes DeepSpeed's default, as for ``use_rts``, ``top2_2nd_expert_sampling``,
            ``num_experts`` and ``k``.
        use_rts: With ``drop_tokens``: random priority among first choices in training. Default
            ``False`` (DeepSpeed: ``True``).
        use_residual: PR-MoE (DeepSpeed's Residual MoE): a dense residual MLP mixed with the MoE
            output by a learned 2-way coefficient (``moe/residual.py``). Not with tensor parallelism.
        noisy_gate_policy: DeepSpeed's router noise in training: ``Jitter`` (input times
            U(0.99, 1.01)), ``RSample`` (top-1 choice from logits plus Gumbel noise; no effect at
            k >= 2) or ``None``; top-k router only (``moe/noisy_gate.py``).
        use_tutel: ``True`` raises ``ValueError`` (the dispatcher is dropless and sorted).
        enable_expert_tensor_parallelism: Split each expert over the Megatron tensor-parallel
            group; ``True`` with no TP group registered raises ``ValueError`` naming the fix;
            ignored at TP size 1.
        top2_2nd_expert_sampling: At k=2 in training, draw the second expert with Gumbel noise;
            ignored at other k, as in DeepSpeed. Default ``False`` (DeepSpeed: ``True``).
        moe_type: ``s2moe``, or ``smoe``: the same layer without noise and gate (the paper's
            SMoE baseline).
        noise_mult_std: a: ``n1 ~ N(1, (a*sigma_x)^2)``; ``a = b = 0`` gives ``x_hat = x``.
        noise_add_std: b: ``n2 ~ N(0, (b*sigma_x)^2)``.
        noise_add_mean: ``n2 ~ N(mu_x, (b*sigma_x)^2)``, the other reading of the paper.
        noise_draws: Gaussian draws per hidden element: ``2`` (``x_hat = n1*x + n2``, the paper's
            form) or ``1`` (``x_hat = x + sigma_x*sqrt(a^2 x^2 + b^2)*eps``: the same distribution of
            ``x_hat`` with half the random numbers; its reparametrised gradient differs, both are
            unbiased). Stays ``2`` until the quality benchmark shows ``1`` trains no worse.
        noisy_routing: Route the noisy stream on ``x_hat`` (``own``) or reuse the clean routing
            (``shared``).
        uncertainty_on: InfoNCE on ``(x, x_hat)`` (``input``: its gradient reaches the layers that
            produced ``x``) or on ``(SMoE(x), SMoE(x_hat))`` (``output``: trains router and
            experts too).
        gate: ``learned`` (``g = sigmoid(x W_g + b_g)``) or ``fixed`` (``g = 0.5``, no gate
            parameters: the no-gate ablation).
        infonce_temperature: tau of InfoNCE.
        infonce_max_tokens: Token sample size bounding InfoNCE's N x N logits.
        balance_coef: alpha: weight of the balance loss in ``aux_loss()`` / ``s2moe_aux_loss``.
        uncertainty_coef: beta: weight of the InfoNCE loss in ``aux_loss()`` / ``s2moe_aux_loss``.
        eval_mode: Inference: ``clean`` (one stream, no noise) or ``noisy`` (the training
            computation, seeded).
        eval_k: Experts per token at inference; ``None`` means ``k``.
        eval_seed: Noise seed of ``eval_mode="noisy"``.
        router_type: ``topk``, or the paper's router baselines ``xmoe`` (Chi et al. 2022) and
            ``stablemoe`` (Dai et al. 2022); works with either ``moe_type``.
        router_dim: ``xmoe``: dimension tokens are projected to for routing.
        router_temperature: ``xmoe``: initial (learnable) temperature.
        freeze_router_after: ``stablemoe``: training forwards before the router is frozen
            (stage 2); ``None``: never.
    """

    hidden_size: int
    num_experts: int = 16
    k: int = 2
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden_size
    ep_size: int = 1
    activation: str = "gelu"
    expert_bias: bool = False
    # DeepSpeed MoE keywords
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = False  # S2MoE default: dropless (DeepSpeed's default is True)
    use_rts: bool = False
    use_residual: bool = False  # PR-MoE: dense residual MLP mixed in by a learned 2-way coefficient
    noisy_gate_policy: Optional[str] = None  # DeepSpeed's "Jitter" / "RSample" (moe/noisy_gate.py)
    use_tutel: bool = False
    enable_expert_tensor_parallelism: bool = False
    top2_2nd_expert_sampling: bool = False
    # S2MoE knobs
    moe_type: str = "s2moe"  # "smoe": the same layer without noise path and gate (baseline)
    noise_mult_std: float = 1.0
    noise_add_std: float = 1.0
    noise_add_mean: bool = False
    noise_draws: int = 2  # 1: one Gaussian draw per element, same x_hat distribution (docstring)
    noisy_routing: str = "own"
    uncertainty_on: str = "input"
    gate: str = "learned"
    infonce_temperature: float = 0.1
    infonce_max_tokens: int = 1024
    balance_coef: float = 0.01
    uncertainty_coef: float = 0.1
    eval_mode: str = "clean"
    eval_k: Optional[int] = None  # default: k
    eval_seed: int = 1234  # noise seed of eval_mode="noisy"
    # router baselines (moe/router_variants.py), with either moe_type
    router_type: str = "topk"  # "xmoe" (Chi et al. 2022), "stablemoe" (Dai et al. 2022)
    router_dim: int = 16  # xmoe: dimension tokens are projected to for routing
    router_temperature: float = 0.07  # xmoe: initial (learnable) temperature
    freeze_router_after: Optional[int] = None  # stablemoe: stage 2 after this many training forwards

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size if isinstance(self.hidden_size, int) else None
        if self.eval_k is None:
            self.eval_k = self.k
        self.validate()

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def renormalize(self) -> bool:
        """Top-k weights renormalised for layers trained with k >= 2; raw top-1 prob for k = 1."""
        return self.k >= 2

    def validate(self) -> None:
        o = "S2MoEConfig"
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
        if self.use_tutel:
            raise config_error(o, "use_tutel", True,
                               "Tutel kernels are not used: S2MoE's dispatcher is dropless and sorted; "
                               "set use_tutel=False")
        if self.noisy_gate_policy == "None":  # DeepSpeed accepts the string for "no policy"
            self.noisy_gate_policy = None
        check_choice(o, "noisy_gate_policy", self.noisy_gate_policy, NOISY_GATE_POLICIES)
        if self.noisy_gate_policy is not None and self.router_type != "topk":
            raise config_error(o, "noisy_gate_policy", self.noisy_gate_policy,
                               f"DeepSpeed's noisy gate acts on the top-k router only (router_type='topk', "
                               f"got router_type={self.router_type!r}); set noisy_gate_policy=None")
        # top2_2nd_expert_sampling acts only at k=2 and is ignored otherwise, as in DeepSpeed, whose
        # default (and Megatron-DeepSpeed's, with topk=1) is True: refusing it would break drop-in use.


def moe_config_from_dict(data: Mapping[str, Any]) -> S2MoEConfig:
    return from_mapping(S2MoEConfig, data, "S2MoEConfig")
