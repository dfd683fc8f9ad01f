"""The layer on a device against the same weights on CPU, and EP=2 against EP=1 (gpu_check.py's parts).

``compare_layer(mode, device)``: one layer built on CPU, copied to ``device``; the same input and
the same random draws (noise, InfoNCE sample, RTS and second-expert sampling: drawn on CPU through
``CpuRandom`` and moved to the device) on both; outputs, losses and every gradient compared, and
the device of every returned tensor checked.

``ep_worker``: one rank of an EP=2 layer (gloo; CUDA tensors on the one GPU) against an EP=1 layer
holding every expert, applied to each rank's tokens (the reference of tests/test_expert_parallel.py).
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Dict, List

import torch
from torch.overrides import TorchFunctionMode

D, H, E, T = 32, 64, 8, 64  # small: parity, not speed (dims multiples of 16 bytes for grouped_mm)
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # relative (norm) error; fp32 without TF32


@dataclass(frozen=True)
class Mode:
    moe_type: str
    k: int
    train: bool
    drop_tokens: bool
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return (f"{self.moe_type} k={self.k} {'train' if self.train else 'eval'} "
                f"{'capacity' if self.drop_tokens else 'dropless'} {str(self.dtype).replace('torch.', '')}")


def all_modes() -> List[Mode]:
    return [Mode(*m) for m in itertools.product(("s2moe", "smoe"), (1, 2), (True, False), (False, True),
                                                (torch.float32, torch.bfloat16))]


_FACTORIES = {torch.randn, torch.rand, torch.randint, torch.randperm, torch.normal}
_LIKE = {torch.randn_like: torch.randn, torch.rand_like: torch.rand}
_INPLACE = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.exponential_, torch.Tensor.bernoulli_}


class CpuRandom(TorchFunctionMode):
    """Every random draw made on CPU from the global CPU generator, then moved to its device: a CPU
    run and a GPU run seeded alike draw the same numbers (CUDA's generator gives others). An explicit
    ``generator=`` is replaced by the CPU one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORIES:
            device = torch.device(kwargs.pop("device", None) or "cpu")
            kwargs.pop("generator", None)
            return func(*args, **kwargs).to(device)
        if func in _LIKE:
            ref = args[0]
            return _LIKE[func](ref.shape, dtype=kwargs.get("dtype") or ref.dtype).to(ref.device)
        if func in _INPLACE:
            target = args[0]
            kwargs.pop("generator", None)
            cpu = torch.empty(target.shape, dtype=target.dtype)
            func(cpu, *args[1:], **kwargs)
            with torch.no_grad():
                target.copy_(cpu)
            return target
        return func(*args, **kwargs)


def build_layer(mode: Mode, seed: int = 0, ep_size: int = 1, noise: float = 1.0):
    from s2moe_dist import S2MoE
    torch.manual_seed(seed)
    return S2MoE(D, num_experts=E, k=mode.k, ffn_hidden_size=H, ep_size=ep_size, activation="gelu",
                 moe_type=mode.moe_type, drop_tokens=mode.drop_tokens, capacity_factor=1.0,
                 eval_capacity_factor=1.0, min_capacity=2, noise_mult_std=noise, noise_add_std=noise,
                 balance_coef=0.01, uncertainty_coef=0.1, infonce_max_tokens=32)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _run(layer, x, g, train: bool, seed: int):
    """Forward (+ backward in training) under CpuRandom; every returned tensor and gradient."""
    layer.train(train)
    torch.manual_seed(seed)
    with CpuRandom(), torch.set_grad_enabled(train):
        xi = x.clone().requires_grad_(train)
        y, l_aux, counts = layer(xi)
        lu = layer.uncertainty_loss
        out = {"output": y, "l_aux": l_aux, "exp_counts": counts, "uncertainty_loss": lu}
        out.update({f"stats.{k}": v for k, v in layer.last_stats.items() if isinstance(v, torch.Tensor)})
        if train:
            loss = (y.float() * g).sum() + layer.aux_loss()
            loss.backward()
            out["grad.input"] = xi.grad
            out.update({f"grad.{n}": p.grad for n, p in layer.named_parameters()})
    return out


def compare_layer(mode: Mode, device, perturb: float = 0.0) -> Dict[str, object]:
    """-> {"errors": {tensor: relative error}, "problems": [text], "ok": bool}. ``perturb`` adds
    that much to one device weight (for testing that a mismatch is caught)."""
    cpu_layer = build_layer(mode).to(mode.dtype)
    dev_layer = copy.deepcopy(cpu_layer).to(device)
    if perturb:
        with torch.no_grad():
            dev_layer.experts.w1.add_(perturb)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=gen).to(mode.dtype)
    g = torch.randn(T, D, generator=gen)
    ref = _run(cpu_layer, x, g, mode.train, seed=2)
    got = _run(dev_layer, x.to(device), g.to(device), mode.train, seed=2)
    problems, errors = [], {}
    want_type = torch.device(device).type
    for name in sorted(set(ref) | set(got)):
        a, b = got.get(name), ref.get(name)
        if (a is None) != (b is None):
            problems.append(f"{name}: {'missing' if a is None else 'extra'} on {device}")
            continue
        if a is None:
            continue
        if a.device.type != want_type:
            problems.append(f"{name} is on {a.device}, expected {want_type}")
        if a.shape != b.shape:
            problems.append(f"{name}: shape {tuple(a.shape)} on {device}, {tuple(b.shape)} on CPU")
            continue
        err = _rel(a, b) if a.is_floating_point() else float((a.cpu() != b.cpu()).sum())
        errors[name] = err
        limit = TOL[mode.dtype] if a.is_floating_point() else 0
        if not err <= limit:
            problems.append(f"{name}: relative error {err:.2e} > {limit:g}" if a.is_floating_point()
                            else f"{name}: {int(err)} values differ")
    return {"errors": errors, "problems": problems, "ok": not problems}


def census_class():
    """SyncCensus, or None where this tree does not have it (a module found in another checkout,
    e.g. through an editable install, would count another tree's layer: not used)."""
    import os

    import s2moe_dist
    try:
        from s2moe_dist.testing import sync_census
    except ImportError:
        return None
    here = os.path.dirname(os.path.abspath(s2moe_dist.__file__)) + os.sep
    return sync_census.SyncCensus if os.path.abspath(sync_census.__file__).startswith(here) else None


def layer_train_step(mode: Mode, device, seed: int = 0):
    """A closure running one training forward + backward of a layer on ``device``."""
    layer = build_layer(mode, seed).to(device=device, dtype=mode.dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=gen).to(device=device, dtype=mode.dtype).requires_grad_()
    g = torch.randn(T, D, generator=gen).to(device)

    def step():
        y, _, _ = layer(x)
        ((y.float() * g).sum() + layer.aux_loss()).backward()
    return step


def ep_worker(rank: int, world: int, device_kind: str, modes: List[Mode]) -> Dict[str, object]:
    """One rank of EP=``world`` (gloo) against EP=1 on every rank's tokens; per mode the largest
    relative error and, where the census exists, this rank's host syncs per training step."""
    import torch.distributed as dist
    device = torch.device("cuda:0" if device_kind == "cuda" else "cpu")
    census = census_class()
    out = {}
    for mode in modes:
        ref = build_layer(mode, noise=0.0).to(device=device, dtype=mode.dtype)
        ep = build_layer(mode, ep_size=world, noise=0.0).to(device=device, dtype=mode.dtype)
        e0, el = ep.first_expert, ep.num_local_experts
        with torch.no_grad():
            for (n, p), (_, p_ref) in zip(ep.named_parameters(), ref.named_parameters()):
                p.copy_(p_ref[e0:e0 + el] if n.startswith("experts.") else p_ref)
        gen = torch.Generator().manual_seed(3)
        xs = torch.randn(world, T, D, generator=gen).to(device=device, dtype=mode.dtype)
        gs = torch.randn(world, T, D, generator=gen).to(device)
        ref.train(mode.train)
        ep.train(mode.train)
        with torch.set_grad_enabled(mode.train):
            x = xs[rank].clone().requires_grad_(mode.train)
            y = ep(x)[0]
            xr = xs.clone().requires_grad_(mode.train)
            y_ref = [ref(xr[r])[0] for r in range(world)]
            errs = {"output": _rel(y, y_ref[rank])}
            if mode.train:
                (y.float() * gs[rank]).sum().backward()
                sum((yr.float() * g).sum() for yr, g in zip(y_ref, gs)).backward()
                errs["grad.input"] = _rel(x.grad, xr.grad[rank])
                for (n, p), (_, p_ref) in zip(ep.named_parameters(), ref.named_parameters()):
                    if p.grad is None:
                        continue
                    if n.startswith("experts."):
                        errs[f"grad.{n}"] = _rel(p.grad, p_ref.grad[e0:e0 + el])
                    else:  # a shared weight sees only this rank's tokens: sum over ranks
                        gsum = p.grad.clone()
                        dist.all_reduce(gsum)
                        errs[f"grad.{n}"] = _rel(gsum, p_ref.grad)
        syncs = None
        if census is not None and mode.train:
            x2 = xs[rank].clone().requires_grad_()
            ep(x2)  # warm
            with census() as c:
                y2 = ep(x2)[0]
                y2.float().sum().backward()
            syncs = {"total": c.total, "by_site": dict(c.by_site)}
        worst = max(errs, key=errs.get)
        out[mode.name] = {"max_error": errs[worst], "worst": worst, "syncs": syncs,
                          "device": str(y.device)}
    return out
