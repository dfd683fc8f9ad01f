"""Writing a checkpoint's optimizer state into a live DeepSpeed engine of any EP / data-parallel layout.

``load_checkpoint(engine, dir, tag)``: ``engine.load_checkpoint`` when the layout is unchanged;
otherwise weights through DeepSpeed (``load_optimizer_states=False``), then fp32 master weights,
Adam moments and step rebuilt from the saved files (``optim_formats``) and written here.
``deepspeed.initialize`` installs it as ``engine.load_checkpoint`` for models with S2MoE layers
(``install_ep_aware_checkpoint_loading``). Every rank reads the whole optimizer state once.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from . import keys
from .canonical import canonical_expert_names
from .io import resolve_tag
from .optim_formats import full_optimizer_state, saved_layout
from .optim_state import CanonicalState, Entry, OptimizerFormat


def _expert_layers(module) -> Dict[str, Any]:
    from ..integrations.deepspeed import DeepSpeedS2MoE
    return {name + "." if name else "": m for name, m in module.named_modules() if isinstance(m, DeepSpeedS2MoE)}


def _param_entry(name: str, p, full: CanonicalState, layers) -> Entry:
    from deepspeed.moe.utils import is_moe_param
    params = full.params
    if not is_moe_param(p):
        if name not in params:
            raise ValueError(f"parameter {name!r} has no optimizer state in the checkpoint")
        return params[name]
    parsed = keys.parse_expert_key(name)
    layer = layers.get(parsed.layer) if parsed is not None else None
    if layer is None:
        raise ValueError(f"expert parameter {name!r} is not in an S2MoE layer")
    items = canonical_expert_names(name, p, layer.first_expert)
    missing = [c for c, _ in items if c not in params]
    if missing:
        raise ValueError(f"no optimizer state for experts {missing[:3]}... in the checkpoint (wrong num_experts?)")
    if items[0][1] is None:
        return params[items[0][0]]
    entries = [params[c] for c, _ in items]
    return {k: (torch.stack([e[k] for e in entries]) if torch.is_tensor(v) and v.dim() > 0 else v)
            for k, v in entries[0].items()}


def _fill_state(state: Dict[str, Any], like: torch.Tensor, entry: Entry, write) -> None:
    """Create missing per-element state tensors (optimizers create them lazily at the first step),
    copy scalars, and ``write(dst_flat_state, src_full_tensor)`` the tensors."""
    for key, value in entry.items():
        if key == "fp32":
            continue
        if torch.is_tensor(value) and value.dim() > 0:
            if key not in state:
                state[key] = torch.zeros_like(like)
            write(state[key], value)
        else:
            state[key] = value.clone() if torch.is_tensor(value) else value


def apply_full_optimizer_state(engine, full: CanonicalState) -> None:
    """Write fp32 master weights and optimizer state of every parameter of ``engine`` from ``full``."""
    opt = engine.optimizer
    layers = _expert_layers(engine.module)
    unfused = {}
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer
        unfused = {id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lg, hg)}
    inner = getattr(opt, "optimizer", opt)
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            entry = _param_entry(name, p, full, layers)
            mapping = getattr(p, "_hp_mapping", "absent")
            if mapping is None:  # ZeRO 1/2: no fragment of this parameter on this rank
                continue
            if mapping != "absent":  # ZeRO 1/2, BF16_Optimizer: a fragment of a flat fp32 partition
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                flat = inner.param_groups[mapping.param_group_index]["params"][0]

                def write(dst, src, lp=lp, hp=hp):
                    dst.narrow(0, hp.start, hp.numel).copy_(src.reshape(-1).narrow(0, lp.start, lp.numel))

                if "fp32" in entry:
                    write(flat.data, entry["fp32"])
                _fill_state(inner.state[flat], flat, entry, write)
            else:  # ZeRO-0: the torch optimizer holds the parameter (or its fp32 copy) itself
                hp = unfused.get(id(p), p)
                if "fp32" in entry and hp is not p:
                    hp.data.copy_(entry["fp32"].view_as(hp))
                _fill_state(inner.state[hp], hp.data, entry, lambda dst, src: dst.copy_(src.view_as(dst)))


def _current_ep_size(engine) -> int:
    sizes = {m.ep_size for m in _expert_layers(engine.module).values()}
    return max(sizes) if sizes else 1


def load_checkpoint(engine, load_dir: str, tag: Optional[str] = None, load_optimizer_states: bool = True,
                    load_lr_scheduler_states: bool = True, load_module_strict: bool = True,
                    load_module_only: bool = False, _ds_load=None):
    """``engine.load_checkpoint`` that survives a change of EP size or data-parallel size (see the
    module docstring). Returns what ``engine.load_checkpoint`` returns; with no ``tag`` and no
    ``latest`` file in ``load_dir`` (an empty ``--load`` folder), DeepSpeed's warning and ``(None, None)``."""
    import deepspeed.comm as dist
    ds_load = _ds_load or engine.load_checkpoint
    if tag is None and not os.path.isfile(os.path.join(load_dir, "latest")):
        # DeepSpeed's contract for a first job whose --load folder is still empty: its own warning
        # and (None, None), not an error (Megatron-DeepSpeed then starts from iteration 0)
        return ds_load(load_dir, None, load_module_strict=load_module_strict,
                       load_optimizer_states=load_optimizer_states, load_lr_scheduler_states=load_lr_scheduler_states,
                       load_module_only=load_module_only)
    tag = resolve_tag(load_dir, tag)
    ckpt_dir = os.path.join(load_dir, tag)
    layout = saved_layout(ckpt_dir)
    kwargs = dict(load_module_strict=load_module_strict, load_lr_scheduler_states=load_lr_scheduler_states,
                  load_module_only=load_module_only)
    same = layout.loads_natively(_current_ep_size(engine), dist.get_world_size(group=engine.data_parallel_group),
                                 engine.zero_optimization_stage())
    if same or not load_optimizer_states or load_module_only:
        return ds_load(load_dir, tag, load_optimizer_states=load_optimizer_states
                       and layout.format is not OptimizerFormat.PORTABLE, **kwargs)
    tp = engine.mpu.get_model_parallel_world_size() if getattr(engine, "mpu", None) is not None else 1
    if tp > 1:  # the state is rebuilt from TP rank 0's files only: refuse rather than mix shards
        raise ValueError(f"load_checkpoint: {ckpt_dir} was saved with another expert- or data-parallel layout "
                         f"(saved ep_size={layout.ep_size}, dp={layout.dp_world_size}), and this model is "
                         f"tensor-parallel (TP={tp}): the optimizer state can be re-sharded at TP=1 only; resume "
                         "with the ep_size and the number of ranks it was saved with")
    out = ds_load(load_dir, tag, load_optimizer_states=False, **kwargs)
    if hasattr(engine.optimizer, "refresh_fp32_params"):  # masters from the loaded weights (ZeRO-0 bf16 skips it)
        engine.optimizer.refresh_fp32_params()
    apply_full_optimizer_state(engine, full_optimizer_state(ckpt_dir, engine, layout))
    return out


def install_ep_aware_checkpoint_loading(engine) -> None:
    """Make ``engine.load_checkpoint`` this module's ``load_checkpoint`` (same signature)."""
    original = engine.load_checkpoint

    def ep_aware_load_checkpoint(load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                                 load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        if custom_load_fn is not None:
            return original(load_dir, tag, load_module_strict, load_optimizer_states, load_lr_scheduler_states,
                            load_module_only, custom_load_fn)
        return load_checkpoint(engine, load_dir, tag, load_optimizer_states=load_optimizer_states,
                               load_lr_scheduler_states=load_lr_scheduler_states,
                               load_module_strict=load_module_strict, load_module_only=load_module_only,
                               _ds_load=original)

    engine.load_checkpoint = ep_aware_load_checkpoint
