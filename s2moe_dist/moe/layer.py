"""The S2MoE layer, pure PyTorch (docs/design.md section 1).

    y = g(x) * SMoE(x) + (1 - g(x)) * SMoE(x_hat),   x_hat = n1 * x + n2,   g = sigmoid(x W_g + b_g)

Both streams are routed, their (token, expert) slots sorted together and dispatched ONCE
(one all-to-all each way under expert parallelism). Eval ``clean`` mode computes one stream.
``moe_type="smoe"`` is the same layer without noise path and gate: the paper's SMoE baseline.
"""
from __future__ import annotations

import types
from typing import Any, Mapping, Optional, Tuple

import torch
from torch import nn

from ..config import S2MoEConfig
from ..deepspeed_args import DEEPSPEED_DEFAULTS, layer_config_from_args  # noqa: F401 (re-export)
from .dispatcher import LocalDispatcher
from .experts import ExpertBank, ModuleExperts
from .infonce import infonce_accuracy, infonce_loss_stacked, infonce_pair
from .mix import gated_mix
from .noise import GaussianNoise
from .router import Routing, StreamRouting
from .router_variants import build_router
from .aux_grad import attach_aux_grad
from .residual import ResidualMLP, residual_mix
from .stats import RoutingStats
from .stream_balance import two_stream_balance_loss
from .tp_dispatcher import tensor_parallel_plan

# DeepSpeed's call conventions (positional order, its defaults with an expert module) are
# translated by s2moe_dist/deepspeed_args.py; these names are re-exported for existing imports.
build_config = layer_config_from_args


def expert_parallel_rank(ep_size: int) -> int:
    """Rank inside the (contiguous) expert-parallel block: DeepSpeed's ``ep_size_N`` groups are
    ranks [i*ep, (i+1)*ep), so the EP rank is ``global_rank % ep_size`` (TP = 1)."""
    if ep_size == 1:
        return 0
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"S2MoEConfig.ep_size={ep_size} needs torch.distributed initialized before the "
                         "layer is built (call deepspeed.init_distributed() or "
                         "torch.distributed.init_process_group() first), or use ep_size=1")
    if dist.get_world_size() % ep_size:
        raise ValueError(f"S2MoEConfig.ep_size={ep_size} must divide the world size "
                         f"({dist.get_world_size()})")
    return dist.get_rank() % ep_size


class S2MoELayer(nn.Module):
    """S2MoE layer. Accepts S2MoE's and ``deepspeed.moe.layer.MoE``'s arguments.

    ``forward(x)`` -> ``(output, l_aux, exp_counts)`` like DeepSpeed: ``l_aux`` is the balance loss
    (mean over the two streams), ``exp_counts`` the slots kept per global expert summed over BOTH
    streams (after capacity drops; twice DeepSpeed's sum in training). ``deepspeed_exp_counts()``
    gives DeepSpeed's count (tokens routed per expert, one stream, before capacity drops).

    Losses: in training, the gradient of ``uncertainty_coef * L_u`` (InfoNCE) is attached to the
    output (``moe/aux_grad.py``): it reaches the parameters with no change to the client's loss,
    under activation checkpointing too, and a client's ``coeff * l_aux`` scales the balance loss
    only. ``self.uncertainty_loss`` then holds L_u's value, detached (for logging: adding it, or
    ``s2moe_aux_loss(model)``, to the loss cannot count it twice). ``attach_uncertainty_grad =
    False`` makes it a live tensor the caller must add itself.
    """

    attach_uncertainty_grad: bool = True

    def __init__(self, hidden_size=None, *args, config: Optional[S2MoEConfig] = None, **kwargs):
        super().__init__()
        cfg, expert = layer_config_from_args(hidden_size, *args, config=config, **kwargs)
        self.config = cfg
        self.num_experts = cfg.num_experts
        self.ep_size = cfg.ep_size
        self.num_local_experts = cfg.num_local_experts
        # Megatron TP (tp_dispatcher.py): None without a registered TP group of size > 1
        self.tp_plan = tensor_parallel_plan(cfg, user_expert=expert is not None)
        self.ep_rank = self.tp_plan.ep_rank if self.tp_plan else expert_parallel_rank(cfg.ep_size)
        self.first_expert = self.ep_rank * self.num_local_experts
        # router_type: topk (router.weight [E, d]) | xmoe | stablemoe; DeepSpeed's Jitter / RSample on topk
        self.router = build_router(cfg)
        if cfg.noisy_gate_policy == "RSample" and cfg.k != 1:
            import warnings
            warnings.warn(f"S2MoE: noisy_gate_policy='RSample' acts on top-1 routing only and has no effect at "
                          f"k={cfg.k} (as in DeepSpeed's top-2 gate)", RuntimeWarning, stacklevel=3)
        if expert is not None:
            self.experts = ModuleExperts(expert, cfg.num_local_experts)
        else:
            shard = self.tp_plan is not None and self.tp_plan.shard_experts
            self.experts = ExpertBank(cfg.num_local_experts, cfg.hidden_size, cfg.ffn_hidden_size,
                                      cfg.activation, cfg.expert_bias, first_expert=self.first_expert,
                                      tp_size=self.tp_plan.size if shard else 1,
                                      tp_rank=self.tp_plan.rank if shard else 0)
            if shard:
                mark_tensor_parallel(self.experts)
                self.register_load_state_dict_pre_hook(_shard_full_experts)
        self.is_s2moe = cfg.moe_type == "s2moe"
        if self.is_s2moe:
            if cfg.gate == "learned":  # gate="fixed": no parameters, g = 0.5
                self.gate = nn.Linear(cfg.hidden_size, 1)
            self.noise = GaussianNoise(cfg.noise_mult_std, cfg.noise_add_std, cfg.noise_add_mean, cfg.noise_draws)
        if cfg.use_residual:  # PR-MoE (moe/residual.py); DeepSpeed's parameter names
            if self.tp_plan is not None:
                raise ValueError("S2MoEConfig.use_residual=True is invalid with tensor-parallel S2MoE layers (the "
                                 "residual MLP is not split over TP); set use_residual=False or build without TP")
            self.mlp = expert if expert is not None else ResidualMLP(
                cfg.hidden_size, cfg.ffn_hidden_size, cfg.activation, cfg.expert_bias)
            self.coefficient = nn.Linear(cfg.hidden_size, 2)
        self._dispatcher = None
        self._routed_idx = (None, None)  # [T, k] chosen experts of each stream, last forward
        self.l_aux = torch.zeros(())
        self.uncertainty_loss = torch.zeros(())
        self.stats: Optional[RoutingStats] = None  # routing statistics of the last forward
        self.eval_k_override: Optional[int] = None  # set by train.evaluate.eval_k_set only

    def set_expert_parallel_rank(self, ep_rank: int) -> None:
        """Hold the experts of expert-parallel rank ``ep_rank``. DeepSpeed's D+E layout
        (use_data_before_expert_parallelism) places ranks otherwise than ``rank % ep_size``, which
        the layer assumed when it was built: the built-in bank is redrawn for the new global ids
        from the same seed, so the same seed still gives the same experts whatever the layout."""
        self.ep_rank = ep_rank
        self.first_expert = ep_rank * self.num_local_experts
        if isinstance(self.experts, ExpertBank):
            self.experts.move_to_experts(self.first_expert)

    # ---- dispatch -------------------------------------------------------------------------
    @property
    def dispatcher(self):
        if self._dispatcher is None:
            if self.tp_plan is not None:
                self._dispatcher = self.tp_plan.dispatcher(self.num_experts, self.ep_size)
            elif self.ep_size == 1:
                self._dispatcher = LocalDispatcher(self.num_experts)
            else:
                from .a2a_dispatcher import AllToAllDispatcher
                self._dispatcher = AllToAllDispatcher(self.num_experts, self.ep_size)
        return self._dispatcher

    def set_dispatcher(self, dispatcher) -> None:
        """Integrations (DeepSpeed groups, Megatron TP) install their own dispatcher here; it is
        called as ``dispatcher(tokens, dispatch_idx, weights, experts, num_dropped=...)`` with the
        routing's dropped-slot count (the int 0 when dropless: no host read needed)."""
        self._dispatcher = dispatcher

    def dispatcher_for(self, ep_group):
        """The dispatcher for ``ep_group`` (e.g. DeepSpeed's), wrapped for TP if the layer is TP."""
        if self.tp_plan is not None:
            return self.tp_plan.dispatcher(self.num_experts, self.ep_size, ep_group=ep_group)
        from .a2a_dispatcher import AllToAllDispatcher
        return AllToAllDispatcher(self.num_experts, self.ep_size, group=ep_group)

    # ---- forward --------------------------------------------------------------------------
    def _route(self, x: torch.Tensor, k: int) -> Routing:
        cfg = self.config
        drop = cfg.drop_tokens
        cf = (cfg.capacity_factor if self.training else cfg.eval_capacity_factor) if drop else None
        return self.router(x, k, cfg.renormalize, capacity_factor=cf, min_capacity=cfg.min_capacity,
                           use_rts=cfg.use_rts and self.training,
                           second_expert_sampling=cfg.top2_2nd_expert_sampling and self.training)

    def _route_two_streams(self, tokens: torch.Tensor, T: int, k: int) -> StreamRouting:
        """The routing of the clean rows ``tokens[:T]`` and the noisy rows ``tokens[T:]``."""
        if self.config.noisy_routing != "own":  # the noisy stream goes where its clean token goes
            r = self._route(tokens[:T], k)
            return StreamRouting(r, r, r.dispatch_idx.repeat(2, 1), r.weights.repeat(2, 1), None, shared=True)
        if self.router.routes_streams_jointly and not self.config.drop_tokens:
            # no capacity: rows route independently, so one router call routes both streams
            r = self._route(tokens, k)
            return StreamRouting(r.rows(0, T), r.rows(T, 2 * T), r.dispatch_idx, r.weights, r, shared=False)
        r_clean, r_noisy = self._route(tokens[:T], k), self._route(tokens[T:], k)  # per-stream capacity
        return StreamRouting(r_clean, r_noisy, torch.cat([r_clean.dispatch_idx, r_noisy.dispatch_idx]),
                             torch.cat([r_clean.weights, r_noisy.weights]), None, shared=False)

    def _experts_per_token(self, k: Optional[int]) -> int:
        """``k`` of this forward: the argument, else ``config.k`` in training and ``config.eval_k``
        (or ``eval_k_set``'s value) at inference."""
        if k is None and not self.training:
            k = self.eval_k_override
        if k is None:
            return self.config.k if self.training else self.config.eval_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ValueError(f"S2MoE.forward(k={k!r}) is invalid: must be an integer in [1, num_experts="
                             f"{self.num_experts}], or None for config.k (training) / config.eval_k (inference)")
        return k

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None, *,
                k: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``k``: experts per token of this call (e.g. inference at another k than training's);
        None: ``config.k`` in training, ``config.eval_k`` at inference."""
        if used_token is not None:
            raise ValueError("S2MoE.forward(used_token=...) is not supported; pass used_token=None")
        cfg = self.config
        shape = hidden_states.shape
        if shape[-1] != cfg.hidden_size:
            raise ValueError(f"S2MoE input has hidden size {shape[-1]}, the layer was built with "
                             f"hidden_size={cfg.hidden_size}")
        x = hidden_states.reshape(-1, cfg.hidden_size)
        T = x.shape[0]
        k = self._experts_per_token(k)
        two_streams = self.is_s2moe and (self.training or cfg.eval_mode == "noisy")
        if self.training:
            self.router.step()  # StableMoE's two-stage schedule counts training forwards

        if not two_streams:
            r = self._route(x, k)
            out, counts = self.dispatcher(x, r.dispatch_idx, r.weights, self.experts, num_dropped=r.num_dropped)
            self.l_aux = self.router.balance_loss(r)
            self.uncertainty_loss = x.new_zeros((), dtype=torch.float32)
            self._record(counts, r.num_dropped, r.expert_idx.numel(), gate=None)
            self._routed_idx = (r.expert_idx.detach(), None)
            return self._output(out, x, shape, hidden_states.dtype), self.l_aux, counts.detach()

        gen = None
        if not self.training:  # eval_mode="noisy": seeded, reproducible noise
            gen = torch.Generator(device=x.device).manual_seed(cfg.eval_seed)
        # [2T, d]: x, then x_hat = n1 * x + n2; in training also InfoNCE's sample of the input rows
        sample = cfg.infonce_max_tokens if self.training and cfg.uncertainty_on == "input" else None
        tokens = self.noise(x, generator=gen, stacked=True, sample_tokens=sample)
        routing = self._route_two_streams(tokens, T, k)
        r_clean, r_noisy = routing.clean, routing.noisy
        dropped = r_clean.num_dropped + r_noisy.num_dropped  # shared routing: the same slots twice
        out, counts = self.dispatcher(tokens, routing.dispatch_idx, routing.weights, self.experts,
                                      num_dropped=dropped)  # ONE dispatch, both streams
        g = torch.sigmoid(self.gate(x)) if cfg.gate == "learned" else x.new_full((T, 1), 0.5)
        y = gated_mix(out, g.to(out.dtype))  # g * out[:T] + (1 - g) * out[T:]

        if routing.shared:
            self.l_aux = self.router.balance_loss(r_clean)
        elif routing.joint is not None:  # both streams from one top-k call: one pass, no [T, E] slices
            self.l_aux = two_stream_balance_loss(routing.joint.probs, routing.joint.expert_idx, self.num_experts)
        else:
            bal_clean = self.router.balance_loss(r_clean)
            self.l_aux = 0.5 * (bal_clean + self.router.balance_loss(r_noisy))
        if self.training:
            stacked = tokens if cfg.uncertainty_on == "input" else out  # [2T, d]: clean rows, then noisy
            z, z_hat = stacked[:T], stacked[T:]
            if self.noise.sampled_pair is not None:  # sampled by the noise module (its backward adds the grads)
                self.uncertainty_loss = infonce_pair(self.noise.sampled_pair, cfg.infonce_temperature)
            else:
                self.uncertainty_loss = infonce_loss_stacked(stacked, cfg.infonce_temperature,
                                                             cfg.infonce_max_tokens)
        else:
            z = z_hat = None
            self.uncertainty_loss = x.new_zeros((), dtype=torch.float32)
        self._record(counts, dropped, 2 * r_clean.expert_idx.numel(), gate=g, z=z, z_hat=z_hat)
        self._routed_idx = (r_clean.expert_idx.detach(), r_noisy.expert_idx.detach())
        return self._output(y, x, shape, hidden_states.dtype), self.l_aux, counts.detach()

    def _output(self, y: torch.Tensor, x: torch.Tensor, shape, dtype) -> torch.Tensor:
        """PR-MoE's residual mix, the input's shape and dtype, and the uncertainty gradient attached."""
        y = y.to(dtype)
        if self.config.use_residual:
            y = residual_mix(y, x, self.mlp, self.coefficient)
        y = y.reshape(shape)
        if self.attach_uncertainty_grad and self.uncertainty_loss.requires_grad:
            y = attach_aux_grad(y, self.uncertainty_loss, self.config.uncertainty_coef)
            self.uncertainty_loss = self.uncertainty_loss.detach()
        return y

    def deepspeed_exp_counts(self, stream: str = "clean") -> torch.Tensor:
        """DeepSpeed's ``exp_counts`` of the last forward: this rank's tokens routed to each global
        expert (top-k choices before capacity drops), of the ``"clean"`` or ``"noisy"`` stream
        (``"noisy"``: None in eval / SMoE). Computed on call (no cost per step), no host sync."""
        if stream not in ("clean", "noisy"):
            raise ValueError(f"deepspeed_exp_counts(stream={stream!r}) is invalid: must be 'clean' or 'noisy'")
        idx = self._routed_idx[0 if stream == "clean" else 1]
        if idx is None:
            return None
        flat = idx.reshape(-1)
        return torch.zeros(self.num_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))

    record_infonce_accuracy: bool = False  # RoutingStats.infonce_accuracy in training (one N x N product)

    def _record(self, counts, dropped, slots: int, gate=None, z=None, z_hat=None) -> None:
        """Detached per-layer statistics for logging (TensorBoard); cheap, no host sync (``dropped``,
        an int or a 0-dim tensor, stays one: the logger reads it when it logs)."""
        accuracy = None
        if z is not None and self.record_infonce_accuracy:
            accuracy = infonce_accuracy(z.detach(), z_hat.detach(), self.config.infonce_max_tokens)
        self.stats = RoutingStats(expert_counts=counts.detach(), drop_fraction=dropped / max(1, slots),
                                  gate_mean=None if gate is None else gate.detach().float().mean(),
                                  infonce_accuracy=accuracy)

    @property
    def last_stats(self) -> Mapping[str, Any]:
        """``self.stats`` as a read-only mapping of the fields that are set (empty before the first
        forward): the name logging code and tests have read the statistics by."""
        return self.stats.as_mapping() if self.stats is not None else types.MappingProxyType({})

    def aux_loss(self) -> torch.Tensor:
        """alpha * L_bal + beta * L_u of the last forward (L_u's value only while its gradient is
        attached to the output: see the class docstring)."""
        cfg = self.config
        return cfg.balance_coef * self.l_aux + cfg.uncertainty_coef * self.uncertainty_loss


def mark_tensor_parallel(bank: ExpertBank) -> None:
    """Megatron's attributes on TP-split expert tensors (read by Megatron / DeepSpeed grad-norm code)."""
    for name, dim in (("w1", 2), ("b1", 1), ("w2", 1)):
        p = getattr(bank, name)
        if p is not None:
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1


def _shard_full_experts(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of a TP layer: a full (TP=1) checkpoint loads, each rank its shard."""
    from .tp_shards import shard_full_experts_
    bank = module.experts
    shard_full_experts_(state_dict, prefix, bank.tp_rank, bank.tp_size, bank.w2.shape[1],
                        bank.activation == "swiglu")


def s2moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``alpha * L_bal + beta * L_u`` over every S2MoE layer of ``model`` (last forward).

        loss = task_loss + s2moe_aux_loss(model)

    The uncertainty term is attached to the layer outputs by default (``moe/aux_grad.py``), so here
    it is its value only: adding this to the loss adds ``alpha * L_bal``'s gradient, and L_u's is
    counted once, by the layer.
    """
    total = None
    for m in model.modules():
        if isinstance(m, S2MoELayer):
            total = m.aux_loss() if total is None else total + m.aux_loss()
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return total
