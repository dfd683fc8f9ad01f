"""Expert banks. Both take expert-sorted tokens and per-expert counts.

``ExpertBank``: all local experts as one weight tensor per matrix, run as a grouped GEMM
(``torch.nn.functional.grouped_mm``). Layout (stable; checkpoints depend on it):
``w1`` [E_local, d, h] ([E_local, d, 2h] for swiglu: gate half then up half), ``w2`` [E_local, h, d],
optional ``b1`` [E_local, h|2h], ``b2`` [E_local, d].

``ModuleExperts``: a user-supplied expert module (DeepSpeed style), deep-copied per local expert
and run in a loop: slower, kept for drop-in compatibility.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: grouped_mm's backward rejects
    expanded (stride-0) gradients such as the one ``y.sum().backward()`` produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _aligned(t: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned row strides (fp32: multiples of 4 elements, bf16: of 8)
    and base addresses (CUDA raises on a misaligned pointer instead of falling back)."""
    if (t.shape[-1] * t.element_size()) % 16:
        return False
    # no address while torch.compile traces: inductor copies misaligned graph inputs itself, and
    # the buffers it allocates are aligned
    return torch.compiler.is_compiling() or t.data_ptr() % 16 == 0


def _group_sizes(offs: torch.Tensor) -> list:
    return torch.diff(offs, prepend=offs.new_zeros(1)).tolist()  # a host sync: the fallback only


def _mm_per_group(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """grouped_mm's two forms as one matmul per group (shapes or dtypes grouped_mm refuses):
    a [R, d] @ b [E, d, h] -> [R, h];  a [d, R] @ b [R, h] -> [E, d, h] (groups along R)."""
    sizes = _group_sizes(offs)
    if b.dim() == 3:
        return torch.cat([c @ b[i] for i, c in enumerate(torch.split(a, sizes))], dim=0)
    return torch.stack([ca @ cb for ca, cb in zip(torch.split(a, sizes, dim=1), torch.split(b, sizes))])


def _grouped_mm_any(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, fast: bool) -> torch.Tensor:
    return F.grouped_mm(a, b, offs=offs) if fast else _mm_per_group(a, b, offs)


# torch.compile: the meta (shape) kernel of aten._grouped_mm accepts only bf16, and the per-group
# fallback needs the group sizes on the host. For those cases the whole grouped GEMM is one opaque
# custom op with its own shape function, so fullgraph tracing holds; its backward is another.
@torch.library.custom_op("s2moe::grouped_mm", mutates_args=())
def _opaque_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _grouped_mm_any(x, w, offs, _aligned(x) and _aligned(w))


@_opaque_grouped_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("s2moe::grouped_mm_backward", mutates_args=())
def _opaque_grouped_mm_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                                offs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    grad = grad.contiguous()
    fast = _aligned(grad) and _aligned(x) and _aligned(w)
    # the formulas of grouped_mm's own backward: dx = g w^T per group, dw_e = x_e^T g_e
    return (_grouped_mm_any(grad, w.transpose(-2, -1), offs, fast),
            _grouped_mm_any(x.t(), grad, offs, fast))


@_opaque_grouped_mm_backward.register_fake
def _(grad, x, w, offs):
    return torch.empty_like(x), torch.empty_like(w)


def _opaque_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _opaque_backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    dx, dw = _opaque_grouped_mm_backward(grad, x, w, offs)
    return dx, dw, None


_opaque_grouped_mm.register_autograd(_opaque_backward, setup_context=_opaque_setup)


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # grouped_mm wants matching dtypes; under autocast cast to the autocast dtype ourselves.
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dt), w.to(dt)
    elif w.dtype != x.dtype:
        x = x.to(w.dtype)
    x = x.contiguous()
    if torch.compiler.is_compiling() and not (x.dtype == torch.bfloat16 and _aligned(x) and _aligned(w)):
        return _opaque_grouped_mm(x, w, offs)
    if _aligned(x) and _aligned(w):
        return _ContiguousGrad.apply(F.grouped_mm(x, w, offs=offs))
    # odd sizes (tiny test shapes) or a misaligned buffer: one matmul per expert
    return _mm_per_group(x, w, offs)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0).to(torch.int32)


class ExpertBank(nn.Module):
    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int,
                 activation: str = "gelu", bias: bool = False, first_expert: int = 0,
                 tp_size: int = 1, tp_rank: int = 0):
        """``tp_size > 1``: hold TP rank ``tp_rank``'s shard of each expert (layout: tp_shards.py):
        w1 [E_local, d, h/tp] (swiglu: 2h/tp), w2 [E_local, h/tp, d]; b2 whole."""
        super().__init__()
        self.num_local_experts = num_local_experts
        self.activation = activation
        self.ffn_hidden_size = ffn_hidden_size  # full size, whatever tp_size
        self.tp_size, self.tp_rank = tp_size, tp_rank
        local = ffn_hidden_size // tp_size
        width = 2 * local if activation == "swiglu" else local
        self.w1 = nn.Parameter(torch.empty(num_local_experts, hidden_size, width))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, local, hidden_size))
        self.b1 = nn.Parameter(torch.zeros(num_local_experts, width)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_local_experts, hidden_size)) if bias else None
        self.reset_parameters(first_expert)

    def reset_parameters(self, first_expert: int = 0, seed: Optional[int] = None) -> None:
        """nn.Linear-style uniform init, one generator per GLOBAL expert id, seeded from the
        default RNG (or ``seed``): the same experts come out whatever the expert- and
        tensor-parallel sizes (the full expert is drawn, then this TP rank's shard kept)."""
        from .tp_shards import shard_tensor
        self.first_expert = first_expert
        if self.w1.is_meta:  # deferred initialisation: nothing to fill (to_empty(), then call again)
            return
        # drawn on the CPU from CPU generators whatever the default device (a CUDA default device
        # would otherwise meet a CPU generator), then copied: the same values on every device
        base = int(torch.randint(0, 2**62, (1,), device="cpu").item()) if seed is None else seed
        d, h = self.w2.shape[2], self.ffn_hidden_size
        width = 2 * h if self.activation == "swiglu" else h
        def shard(name, w):  # this TP rank's slice of a full expert matrix
            return shard_tensor(name, w, self.tp_rank, self.tp_size, self.activation == "swiglu")
        with torch.no_grad():
            for i in range(self.num_local_experts):
                g = torch.Generator(device="cpu").manual_seed(base + first_expert + i)
                w1 = torch.empty(d, width, device="cpu").uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d), generator=g)
                w2 = torch.empty(h, d, device="cpu").uniform_(-1 / math.sqrt(h), 1 / math.sqrt(h), generator=g)
                self.w1[i].copy_(shard("w1", w1))
                self.w2[i].copy_(shard("w2", w2))
        self.seed, self._drawn_versions = base, self._versions()

    def _versions(self) -> Tuple[int, ...]:
        return tuple(p._version for p in self.parameters())  # bumped by every in-place write

    def move_to_experts(self, first_expert: int) -> None:
        """Hold global experts ``[first_expert, first_expert + E_local)`` instead: drawn from the
        same seed, so they are the experts a layer built with these ids would hold. Refused once
        the weights changed since they were drawn (a load or an optimizer step would be lost)."""
        if first_expert == self.first_expert:
            return
        if self.w1.is_meta or getattr(self, "_drawn_versions", None) is None:  # never drawn: nothing to redo
            self.first_expert = first_expert
            return
        if self._versions() != self._drawn_versions:
            last = self.first_expert + self.num_local_experts
            raise RuntimeError(
                f"ExpertBank: this rank's experts {self.first_expert}..{last - 1} changed since they were drawn "
                f"(load_state_dict or an optimizer step), so they cannot become experts {first_expert}.."
                f"{first_expert + self.num_local_experts - 1}, the ones DeepSpeed places on this rank "
                "(use_data_before_expert_parallelism orders expert-parallel ranks otherwise than rank % ep_size): "
                "load checkpoints after deepspeed.initialize (engine.load_checkpoint)")
        self.reset_parameters(first_expert, seed=self.seed)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            a, b = h.chunk(2, dim=-1)
            return F.silu(a) * b
        return F.gelu(h) if self.activation == "gelu" else F.relu(h)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, add_b2: bool = True) -> torch.Tensor:
        """x: [R, d] sorted by local expert; counts: [E_local] rows per expert (sum == R).
        ``add_b2=False``: leave b2 out (TP adds it once to the partial sums it reduces)."""
        if x.shape[0] == 0:
            # keep the parameters in the graph so every rank produces (zero) expert gradients
            zero = self.w1.sum() * 0 + self.w2.sum() * 0
            return x.new_zeros(0, self.w2.shape[2]) + zero.to(x.dtype)
        offs = _offsets(counts)
        h = _grouped_mm(x, self.w1, offs)
        if self.b1 is not None:
            h = h + torch.repeat_interleave(self.b1, counts, dim=0, output_size=x.shape[0]).to(h.dtype)
        h = _grouped_mm(self._act(h), self.w2, offs)
        if self.b2 is not None and add_b2:
            h = h + torch.repeat_interleave(self.b2, counts, dim=0, output_size=x.shape[0]).to(h.dtype)
        return h


class ModuleExperts(nn.Module):
    """DeepSpeed-style experts: ``expert`` deep-copied ``num_local_experts`` times."""

    def __init__(self, expert: nn.Module, num_local_experts: int):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(num_local_experts)])

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(x, counts.tolist(), dim=0)
        outs = []
        for expert, chunk in zip(self.experts, chunks):
            out = expert(chunk)
            outs.append(out[0] if isinstance(out, tuple) else out)
        if x.shape[0] == 0:
            zero = sum(p.sum() * 0 for p in self.parameters())
            return x.new_zeros(x.shape) + zero
        return torch.cat(outs, dim=0)
