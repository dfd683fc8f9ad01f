"""S2MoE as DeepSpeed's engine must see it: a drop-in for ``deepspeed.moe.layer.MoE``.

What DeepSpeed 0.19.8 does with an MoE layer, and what this module provides for it:

- The engine finds MoE layers with ``isinstance(m, deepspeed.moe.layer.MoE)``; only then are
  expert gradients reduced over the expert-data-parallel (EDP) group instead of averaged over
  everything, experts broadcast within EDP groups only, and expert checkpoints written.
  ``DeepSpeedS2MoE`` is an ``S2MoELayer`` AND a ``MoE`` (``nn.Module`` initialised once, none of
  DeepSpeed's gate/experts built).
- Expert parameters carry ``allreduce=False`` and ``group_name="ep_size_N"`` like DeepSpeed's, so
  ``split_params_into_different_moe_groups_for_optimizer`` and ZeRO 1/2 treat them as MoE params.
- ``set_deepspeed_parallelism`` (called by ``deepspeed.initialize``) creates DeepSpeed's groups and
  hands them to the layer as its ``ParallelPlan`` (``set_parallel_plan``: the fused all-to-all then
  runs on DeepSpeed's EP group; where DeepSpeed places a rank otherwise than the layer's default
  plan, the D+E layout, the built-in experts are redrawn for their new global ids from the same
  seed). A layer the engine never saw moves onto the same groups at its first forward.
- Inside ``deepspeed.initialize`` the layer checks the engine it is being attached to: ZeRO-3 and an
  optimizer whose param groups are not split into MoE groups fail with errors naming the fix, and
  under ZeRO-0 fp32 the gradient clipping norm is replaced by one that counts every expert shard
  once (0.19.8's ``clip_grad_norm_`` AVERAGES the per-rank norms, which is wrong under EP).
- Checkpoints: see ``s2moe_dist.checkpoint`` (``state_dict.py``: state-dict hooks; ``live.py``: change
  of EP size, ``engine.load_checkpoint`` of an engine holding S2MoE layers is replaced by its EP-aware
  version).
"""
from __future__ import annotations

import sys
import warnings
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn

import deepspeed
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups as ds_groups

from ..moe.layer import S2MoELayer
from ..checkpoint.keys import is_bank_bias
from ..checkpoint.state_dict import split_expert_state, stack_expert_state
from ..deepspeed_args import layer_config_from_args
from ..parallel.plan import ParallelPlan, make_parallel_plan

ZERO3_ERROR = ("zero_optimization.stage=3 is invalid with S2MoE layers: DeepSpeed's native MoE, which "
               "S2MoE is to the engine, is not supported under ZeRO stage 3 (the engine refuses MoE layers "
               "with stage 3). Use zero_optimization.stage 1 or 2 (configs/deepspeed/zero1_*.json, "
               "zero2_*.json; zero2_offload.json to keep optimizer state in CPU memory).")

PARAM_GROUP_FIX = ("Build the optimizer from s2moe_dist.integrations.deepspeed.s2moe_param_groups(model) "
                   "(or deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer), e.g. "
                   "torch.optim.AdamW(s2moe_param_groups(model, weight_decay=0.1), lr=...)")


# The engine-side fixes below replace DeepSpeed internals found by reading 0.19.8's source.
TESTED_DEEPSPEED = "0.19."
_warned: set = set()


def warn_deepspeed_internals(what: str) -> None:
    """Say once per message that an engine fix could not be applied as written for 0.19.8."""
    msg = (f"s2moe_dist: {what} (DeepSpeed {deepspeed.__version__}; these fixes were written and tested "
           f"against DeepSpeed 0.19.8). Check that the reported gradient norm equals a single-process run "
           f"(tests/test_deepspeed_engine.py) or pin deepspeed==0.19.8.")
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _inside_deepspeed_initialize(max_depth: int = 40) -> bool:
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return False
        if frame.f_code.co_name == "initialize" and frame.f_globals.get("__name__") == "deepspeed":
            return True
        frame = frame.f_back
    return False


class _MoEType(_DeepSpeedMoE):
    """``deepspeed.moe.layer.MoE`` for ``isinstance`` only: its __init__ (gate, deep-copied experts)
    is skipped, ``nn.Module.__init__`` runs once."""

    def __init__(self, *args, **kwargs):
        nn.Module.__init__(self)


def mark_expert_params(module: nn.Module, group_name: str) -> None:
    """Mark every parameter of ``module`` as an expert parameter the way DeepSpeed's ``Experts`` does."""
    for p in module.parameters():
        p.allreduce = False
        p.group_name = group_name


class DeepSpeedS2MoE(S2MoELayer, _MoEType):
    """The S2MoE layer as a ``deepspeed.moe.layer.MoE``. Same arguments and forward as ``S2MoELayer``
    (which accepts ``MoE``'s arguments too); see the module docstring for what changes."""

    def __init__(self, hidden_size=None, *args, config=None, plan=None, **kwargs):
        # deepspeed.moe.layer.MoE's call (positional order, its defaults) -> S2MoEConfig + expert module
        cfg, expert = layer_config_from_args(hidden_size, *args, config=config, **kwargs)
        super().__init__(config=cfg, expert=expert, plan=plan)
        self.expert_group_name = f"ep_size_{self.ep_size}"
        self.use_residual = self.config.use_residual  # PR-MoE: self.mlp / self.coefficient are dense
        self.enable_expert_tensor_parallelism = self.config.enable_expert_tensor_parallelism
        mark_expert_params(self.experts, self.expert_group_name)
        if self.plan.tensor_parallel and not self.plan.shard_experts:
            # whole experts under TP: ZeRO 1/2 partition them over an EDP group that may hold TP peers,
            # and their grad norm counts a tensor that is not model-parallel on TP rank 0 only (so the
            # other TP ranks' partitions were missed); every element sits in one partition: count all
            for p in self.experts.parameters():
                p.model_parallel = True
        self.register_state_dict_post_hook(split_expert_state)
        self.register_load_state_dict_pre_hook(stack_expert_state)

    # ---- groups -------------------------------------------------------------------------------
    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by ``deepspeed.initialize`` on every module that has it."""
        engine = _calling_engine()
        if engine is not None:
            check_engine(engine)
        elif _inside_deepspeed_initialize():
            warn_deepspeed_internals("deepspeed.initialize called set_deepspeed_parallelism but no "
                                     "DeepSpeedEngine was found on the call stack: the ZeRO-3 and param-group "
                                     "checks, the EP-aware load_checkpoint and the MoE gradient-norm fixes "
                                     "were NOT installed")
        self._create_process_groups(use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        self.keep_router_fp32()

    def keep_router_fp32(self) -> None:
        """Undo the engine's bf16/fp16 cast of the router (``deepspeed.initialize`` casts every parameter
        just before calling ``set_deepspeed_parallelism``, and keeps only buffers named in
        ``keep_in_fp32_modules`` in fp32): routing decisions come from fp32 logits of fp32 weights.
        The optimizer, built after this, holds the router weight in fp32."""
        cast = [p for p in self.router.parameters() if p.is_floating_point() and p.dtype != torch.float32]
        if not cast:
            return
        engine = _calling_engine()
        if engine is None or not isinstance(engine.client_optimizer, torch.optim.Optimizer):
            # DeepSpeed builds the optimizer from model_parameters itself: a fp32 router among bf16
            # parameters of one group would turn the whole flat ZeRO buffer fp32; keep DeepSpeed's cast
            msg = ("s2moe_dist: the router weight stays in the training dtype under DeepSpeed bf16/fp16: it is kept "
                   "in fp32 only when deepspeed.initialize gets a torch optimizer (e.g. torch.optim.AdamW("
                   "s2moe_param_groups(model), ...) from s2moe_dist.integrations.deepspeed)")
            if msg not in _warned:
                _warned.add(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return
        for p in cast:
            p.data = p.data.float()
        separate_param_group(engine.client_optimizer, cast, "router_fp32")

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        check_tensor_parallel_mpu(self, ds_groups.mpu)
        if self.expert_group_name not in ds_groups._get_expert_parallel_group_dict():
            if ds_groups.mpu is None or not self.enable_expert_tensor_parallelism:
                ds_groups._create_expert_and_data_parallel(
                    self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
            else:
                ds_groups._create_expert_data_and_model_parallel(
                    self.ep_size, mpu=ds_groups.mpu, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        # the D+E topology (use_data_before_expert_parallel_) orders EP ranks otherwise than rank % ep_size
        self.set_parallel_plan(deepspeed_plan(self.plan, self.expert_group_name))

    def forward(self, *args, **kwargs):
        if self.ep_size > 1 and self.plan.ep_group is None:  # deepspeed.initialize never saw this layer
            _ensure_deepspeed_comm()
            self._create_process_groups()
        return super().forward(*args, **kwargs)


def deepspeed_plan(plan: ParallelPlan, group_name: str) -> ParallelPlan:
    """``plan`` with DeepSpeed's EP group ``group_name`` (``ep_size_N``); the EP rank is this rank's
    place in it (``make_parallel_plan``)."""
    return make_parallel_plan(plan.ep_size, ep_group=ds_groups._get_expert_parallel_group(group_name),
                              tp_group=plan.tp_group, shard_experts=plan.shard_experts, owner="S2MoEConfig")


def separate_param_group(optimizer: torch.optim.Optimizer, params, suffix: str) -> None:
    """Move ``params`` out of their optimizer groups into groups of their own (same options): ZeRO 1/2
    flatten each group into ONE buffer of one dtype, so fp32 parameters among bf16 ones need a group."""
    ids = {id(p) for p in params}
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in ids]
        if not moved or len(moved) == len(group["params"]):
            continue
        group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                                   "name": f"{group.get('name', 'group')}_{suffix}"})


def check_tensor_parallel_mpu(layer, mpu) -> None:
    """The layer's tensor parallelism (``integrations.megatron.use_megatron_parallel_state``) and
    DeepSpeed's ``mpu`` must agree: DeepSpeed lays expert groups out from the mpu."""
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size
    mpu_tp = bwc_tensor_model_parallel_world_size(mpu)
    layer_tp = layer.plan.tp_size
    if mpu_tp == layer_tp:
        return
    if mpu is None:
        raise ValueError(f"the S2MoE layer is tensor-parallel (TP={layer_tp}) but DeepSpeed got no mpu: pass "
                         "mpu=s2moe_dist.integrations.megatron.megatron_mpu() to deepspeed.initialize")
    raise ValueError(f"DeepSpeed's mpu has tensor-parallel size {mpu_tp} but the S2MoE layer was built for "
                     f"TP={layer_tp}: call s2moe_dist.integrations.megatron.use_megatron_parallel_state() after "
                     "parallel_state.initialize_model_parallel and before building the model")


def _ensure_deepspeed_comm() -> None:
    import torch.distributed as dist
    if not deepspeed.comm.is_initialized():
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("S2MoE with ep_size > 1 needs torch.distributed initialized: call "
                             "deepspeed.init_distributed() before building the model")
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)


def _calling_engine(max_depth: int = 6):
    """The ``DeepSpeedEngine`` whose __init__ is calling us (``_configure_distributed_model``), if any."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, DeepSpeedEngine):
            return owner
        frame = frame.f_back
    return None


# ---- engine checks ------------------------------------------------------------------------------
def engine_wraps_optimizer(engine) -> bool:
    """Whether DeepSpeed wraps the optimizer (ZeRO 1/2, bf16/fp16 optimizers): those need MoE param groups."""
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()


def check_engine(engine) -> None:
    """Checks and fixes made while ``deepspeed.initialize`` attaches a model holding S2MoE layers
    (once per engine, though every layer calls it)."""
    if engine.__dict__.get("_s2moe_checked"):
        return
    engine.__dict__["_s2moe_checked"] = True
    if not deepspeed.__version__.startswith(TESTED_DEEPSPEED):
        warn_deepspeed_internals("the engine fixes (MoE gradient norm under ZeRO-0, EP-aware "
                                 "load_checkpoint) replace internals of another DeepSpeed version")
    if engine.zero_optimization_stage() == 3:
        raise ValueError(ZERO3_ERROR)
    opt = engine.client_optimizer
    if isinstance(opt, torch.optim.Optimizer) and engine_wraps_optimizer(engine):
        check_param_groups(opt.param_groups)
    from ..checkpoint.live import install_ep_aware_checkpoint_loading
    install_ep_aware_checkpoint_loading(engine)
    install_aux_grad_scaling(engine)
    if engine.zero_optimization_stage() == 0:
        if engine.bfloat16_enabled() or engine.fp16_enabled():
            install_moe_grad_norm_for_unfused_optimizer(engine)
        else:
            install_moe_grad_clipping(engine)


def install_aux_grad_scaling(engine) -> None:
    """Scale the uncertainty gradient the layers attach to their outputs (``moe/aux_grad.py``) like the
    loss: ``engine.backward(loss)`` runs inside ``scale_like(loss)``, so the attached gradient gets the
    factor the engine applies to ``loss`` (1 / gradient_accumulation_steps, the fp16 loss scale)."""
    from ..moe.aux_grad import scale_like
    original = engine.backward

    def backward(loss, *args, **kwargs):
        with scale_like(loss):
            return original(loss, *args, **kwargs)

    engine.backward = backward


def check_param_groups(param_groups: Iterable[Mapping[str, Any]]) -> None:
    """Every expert parameter must sit in a group marked ``moe=True`` and named after its EP group;
    raises ValueError naming the group and the fix otherwise."""
    for i, group in enumerate(param_groups):
        params = list(group["params"])
        experts = [p for p in params if is_moe_param(p)]
        label = f"optimizer param group {i}" + (f" ({group['name']!r})" if "name" in group else "")
        if group.get("moe", False):
            names = {p.group_name for p in experts}
            if len(experts) != len(params) or names != {group.get("name")}:
                raise ValueError(f"{label} is marked moe=True but must hold only expert parameters of one "
                                 f"expert group and be named after it (found {sorted(names)}). {PARAM_GROUP_FIX}")
        elif experts:
            raise ValueError(f"{label} mixes {len(experts)} S2MoE expert parameter(s) into a group without "
                             "'moe': True, so DeepSpeed's ZeRO/bf16 optimizer would reduce and partition them "
                             "like dense ones (its own check: 'None of the param groups are marked as MoE'). "
                             + PARAM_GROUP_FIX)


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 or name.endswith("bias") or is_bank_bias(name)


def s2moe_param_groups(model: nn.Module, weight_decay: float = 0.0, **options) -> List[Dict[str, Any]]:
    """Optimizer param groups for a model holding S2MoE (or DeepSpeed MoE) layers.

    Dense parameters go to ``"decay"`` (weight_decay) and ``"no_decay"`` (biases, 1-D params such as
    norms; weight_decay 0); expert parameters are split out by DeepSpeed's own
    ``split_params_into_different_moe_groups_for_optimizer`` into ``moe=True`` groups named
    ``"ep_size_N"`` (the names ZeRO looks their EDP group up by). ``options`` (lr, betas, ...) are
    copied into every group. Empty groups are dropped.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay, **options},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, **options}]
    groups = split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])
    return [g for g in groups if g["params"]]


# ---- gradient norm under expert parallelism ------------------------------------------------------
def global_grad_norm(parameters: Iterable[torch.Tensor], mpu=None, norm_type: float = 2.0) -> float:
    """2-norm of all gradients of the model, each expert shard counted once: dense gradients (equal on
    every data-parallel rank after reduction) once, expert gradients summed over their EP group.
    Same combination as DeepSpeed's BF16 optimizer (``get_norm_with_moe_layers``). Collective: every
    rank calls it. Returns -1 if a gradient is inf/NaN (DeepSpeed's convention)."""
    from deepspeed.runtime.utils import get_global_norm_of_tensors, get_norm_with_moe_layers, \
        is_model_parallel_parameter
    dense: List[torch.Tensor] = []
    expert: Dict[str, List[torch.Tensor]] = defaultdict(list)
    for p in parameters:
        if p.grad is None:
            continue
        if is_moe_param(p):
            # experts split over TP: DeepSpeed sums expert norms over TP, so a TP-replicated expert
            # tensor (b2) is counted on TP rank 0 only
            if (mpu is None or ds_groups._get_expert_model_parallel_world_size() == 1
                    or is_model_parallel_parameter(p) or mpu.get_model_parallel_rank() == 0):
                expert[p.group_name].append(p.grad)
        elif mpu is None or is_model_parallel_parameter(p) or mpu.get_model_parallel_rank() == 0:
            dense.append(p.grad)
    device = next((g.device for g in dense), None) or next((g.device for gs in expert.values() for g in gs), None)
    if device is None:  # no gradient at all on this rank: the reductions still need a tensor on the comm device
        from deepspeed.accelerator import get_accelerator
        device = torch.device(get_accelerator().current_device_name())
    if not dense:
        dense.append(torch.zeros(1, device=device))
    dense_norm = get_global_norm_of_tensors(dense, mpu=mpu, norm_type=norm_type)
    for name in ds_groups._get_expert_parallel_group_dict():  # every rank joins every group's reduction
        if not expert[name]:
            expert[name].append(torch.zeros(1, device=device))
    ordered = {name: expert[name] for name in sorted(expert)}
    return float(get_norm_with_moe_layers(dense_norm, mpu=mpu, expert_tensors=ordered, norm_type=norm_type))


def install_moe_grad_clipping(engine) -> None:
    """Replace this engine's ZeRO-0 fp32 clipping (``clip_fp32_gradients``), which averages per-rank
    norms, with one using ``global_grad_norm``; the norm is also reported by ``get_global_grad_norm()``."""
    import types
    if not callable(getattr(engine, "clip_fp32_gradients", None)):
        warn_deepspeed_internals("DeepSpeedEngine.clip_fp32_gradients not found: ZeRO-0 fp32 gradient "
                                 "clipping keeps DeepSpeed's own norm, which averages per-rank norms under EP")
        return

    def clip_fp32_gradients(self):
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = global_grad_norm(params, mpu=self.mpu)
        self._global_grad_norm = norm
        if norm < 0:  # inf/NaN gradients: leave them for the caller to see
            return
        coef = self.gradient_clipping() / (norm + 1e-6)
        if coef < 1.0:
            for p in params:
                p.grad.detach().mul_(coef)

    engine.clip_fp32_gradients = types.MethodType(clip_fp32_gradients, engine)


def _unfused_step_with_expert_norm(self, closure=None):
    """``FP16_UnfusedOptimizer.step`` (DeepSpeed 0.19.8) with the gradient norm taken over dense AND
    expert gradients (``global_grad_norm``); the original leaves expert gradients out of the norm it
    reports and clips by. Everything else is the original's, line for line."""
    from deepspeed.runtime.utils import is_invalid_grad_norm
    self.overflow = self.overflow_checker.check()
    if self.overflow:
        return self._skip_invalid_grad_norm()
    norm = global_grad_norm([p for group in self.fp16_groups for p in group], mpu=self.mpu)
    for i, _ in enumerate(self.fp16_groups):
        for fp32_param, fp16_param in zip(self.fp32_groups[i], self.fp16_groups[i]):
            if fp16_param.grad is None:
                fp32_param.grad = torch.zeros(fp16_param.size(), dtype=fp32_param.dtype, device=fp32_param.device)
            else:
                fp32_param.grad = fp16_param.grad.to(fp32_param.dtype)
    self._global_grad_norm = norm
    if is_invalid_grad_norm(norm):
        return self._skip_invalid_grad_norm()
    self._update_scale(False)
    self.unscale_and_clip_grads(norm)
    self.optimizer.step()
    for fp32_group, fp16_group in zip(self.fp32_groups, self.fp16_groups):
        for fp32_param, fp16_param in zip(fp32_group, fp16_group):
            fp32_param.grad = None
            fp16_param.data.copy_(fp32_param.data)
    return self.overflow


def install_moe_grad_norm_for_unfused_optimizer(engine) -> None:
    """ZeRO-0 bf16/fp16 with a torch optimizer runs DeepSpeed's ``FP16_UnfusedOptimizer``, whose norm
    skips expert gradients (``split_params_grads_into_shared_and_expert_params(...)[0]`` only). Wrap
    this engine's ``_configure_fp16_optimizer`` (called later in ``deepspeed.initialize``) so the
    optimizer it builds uses ``_unfused_step_with_expert_norm``."""
    import types
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    configure = getattr(engine, "_configure_fp16_optimizer", None)
    if not callable(configure):
        warn_deepspeed_internals("DeepSpeedEngine._configure_fp16_optimizer not found: ZeRO-0 bf16/fp16 "
                                 "keeps DeepSpeed's gradient norm, which leaves expert gradients out")
        return

    def _configure_fp16_optimizer(optimizer, low_precision_dtype):
        wrapped = configure(optimizer, low_precision_dtype)
        if type(wrapped) is FP16_UnfusedOptimizer and not wrapped.fused_lamb_legacy:
            wrapped.step = types.MethodType(_unfused_step_with_expert_norm, wrapped)
        return wrapped

    engine._configure_fp16_optimizer = _configure_fp16_optimizer


# ---- config validation --------------------------------------------------------------------------
def _get(cfg: Mapping[str, Any], path: str, default=None):
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _enabled(cfg, section: str) -> bool:
    return bool(_get(cfg, f"{section}.enabled", False))


def validate_deepspeed_config(ds_config: Mapping[str, Any], model_has_moe: bool = True,
                              client_optimizer: bool = True, device: Optional[str] = None) -> None:
    """Check a DeepSpeed config dict before any process group exists. Raises ValueError naming the
    field, the value and the fix for what DeepSpeed would reject late, or silently get wrong, with
    S2MoE: ZeRO-3 with MoE, fp16 on CPU, fp16+bf16, ZeRO's MoE requirements, offload with a torch
    optimizer. ``client_optimizer``: a torch optimizer is passed to ``deepspeed.initialize``.
    ``device``: "cpu"/"cuda"; default: DeepSpeed's accelerator."""
    from ..config import check_choice, check_float, check_int, config_error
    o = "ds_config"
    if not isinstance(ds_config, Mapping):
        raise ValueError(f"ds_config must be a dict (the parsed DeepSpeed JSON), got {type(ds_config).__name__}")
    stage = _get(ds_config, "zero_optimization.stage", 0)
    check_choice(o, "zero_optimization.stage", stage, (0, 1, 2, 3))
    if stage == 3 and model_has_moe:
        raise ValueError(ZERO3_ERROR)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if key in ds_config:
            check_int(o, key, ds_config[key], 1)
    if "gradient_clipping" in ds_config:
        check_float(o, "gradient_clipping", ds_config["gradient_clipping"])
    fp16, bf16 = _enabled(ds_config, "fp16"), _enabled(ds_config, "bf16")
    if fp16 and bf16:
        raise config_error(o, "fp16.enabled", True, "fp16 and bf16 cannot both be enabled; pick one")
    if device is None:
        from deepspeed.accelerator import get_accelerator
        device = get_accelerator().device_name()
    if fp16 and device == "cpu":
        raise config_error(o, "fp16.enabled", True, "DeepSpeed's CPU accelerator has no fp16 training; use "
                           "bf16 (bf16.enabled: true) or fp32 on CPU")
    if model_has_moe and stage in (1, 2):
        for key in ("contiguous_gradients", "reduce_scatter"):
            if _get(ds_config, f"zero_optimization.{key}", True) is False:
                raise config_error(o, f"zero_optimization.{key}", False,
                                   f"DeepSpeed's ZeRO stage {stage} supports MoE only with {key}: true")
    offload = _get(ds_config, "zero_optimization.offload_optimizer.device", "none")
    if offload in ("cpu", "nvme"):
        if stage not in (1, 2, 3):
            raise config_error(o, "zero_optimization.offload_optimizer.device", offload,
                               "optimizer offload needs zero_optimization.stage 1 or 2")
        if client_optimizer and "optimizer" not in ds_config and ds_config.get("zero_force_ds_cpu_optimizer", True):
            raise config_error(o, "zero_force_ds_cpu_optimizer", ds_config.get("zero_force_ds_cpu_optimizer", True),
                               "optimizer offload with a torch optimizer needs \"zero_force_ds_cpu_optimizer\": false "
                               "(or an \"optimizer\" section, which selects DeepSpeedCPUAdam)")
