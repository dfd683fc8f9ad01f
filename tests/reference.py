"""Independent references the layer tests compare against, in plain PyTorch.

They read only the layer's documented parameters (router.weight [E,d], experts.w1 [E,d,h|2h],
experts.w2 [E,h,d], experts.b1/b2, gate.weight/bias) and loop over tokens and chosen experts: no
sorting, no grouped_mm, no code shared with s2moe_dist.
"""
import math

import torch

from s2moe_dist import S2MoELayer

ODD = dict(d=7, h=5, E=5, T=23)       # not 16-byte aligned: the expert bank's per-expert fallback
ALIGNED = dict(d=8, h=12, E=4, T=32)  # aligned: the grouped_mm path


def ref_act(h, activation):
    if activation == "relu":
        return torch.where(h > 0, h, torch.zeros_like(h))
    if activation == "gelu":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    if activation == "swiglu":  # w1 columns: gate half, then up half
        a, b = h.chunk(2, dim=-1)
        return a * torch.sigmoid(a) * b
    raise AssertionError(activation)


def ref_bank_expert(layer):
    """Expert e of the built-in bank as a function of one token: W2 act(W1 x + b1) + b2."""
    bank, act = layer.experts, layer.config.activation

    def expert(e, xt):
        h = xt @ bank.w1[e]
        if bank.b1 is not None:
            h = h + bank.b1[e]
        y = ref_act(h, act) @ bank.w2[e]
        return y + bank.b2[e] if bank.b2 is not None else y
    return expert


def ref_routing(x, router_weight, k, renormalize, capacity=None):
    """Per token: list of (expert, combine weight). Capacity drops as DeepSpeed's gates: every
    first choice before any second choice, token order within a choice."""
    probs = torch.softmax(x.float() @ router_weight.float().t(), dim=-1)
    top = torch.topk(probs, k, dim=-1).indices
    keep = [[True] * k for _ in range(x.shape[0])]
    dropped = 0
    if capacity is not None:
        used = {}
        for j in range(k):
            for t in range(x.shape[0]):
                e = int(top[t, j])
                if used.get(e, 0) < capacity:
                    used[e] = used.get(e, 0) + 1
                else:
                    keep[t][j] = False
                    dropped += 1
    routes = []
    for t in range(x.shape[0]):
        kept = [(int(top[t, j]), probs[t, top[t, j]]) for j in range(k) if keep[t][j]]
        if renormalize and kept:
            s = sum(p for _, p in kept)
            kept = [(e, p / s) for e, p in kept]
        routes.append(kept)
    return routes, probs, top, dropped


def ref_smoe(x, layer, k, expert=None, capacity=None):
    """SMoE(x)_t = sum over kept top-k experts e of w_te * Expert_e(x_t)."""
    expert = expert or ref_bank_expert(layer)
    renorm = layer.config.k >= 2  # the training k decides, also at another eval_k
    routes, probs, top, dropped = ref_routing(x, layer.router.weight, k, renorm, capacity)
    rows = []
    for t, kept in enumerate(routes):
        y = torch.zeros(x.shape[1], dtype=torch.float32)
        for e, w in kept:
            y = y + w * expert(e, x[t])
        rows.append(y)
    return torch.stack(rows), probs, top, dropped


def ref_gate(layer, x):
    return torch.sigmoid(x @ layer.gate.weight.t() + layer.gate.bias)


def capture_noise(layer):
    """Record x_hat of each forward (a hook, no change to the layer). The layer asks the noise
    module for both streams stacked, [x; x_hat] (2T rows): x_hat is the rows after the input's T."""
    seen = []

    def hook(module, args, out):
        T = args[0].shape[0]
        seen.append((out[T:] if out.shape[0] == 2 * T else out).detach().clone())
    layer.noise.register_forward_hook(hook)
    return seen


def make_layer(seed=0, cls=None, **kw):
    """The pure PyTorch layer by default (the public ``S2MoE`` is its DeepSpeed-facing subclass
    when DeepSpeed is installed)."""
    torch.manual_seed(seed)
    return (cls or S2MoELayer)(**kw)


def ref_balance(probs, top, E):
    """Switch loss E * sum_e f_e P_e; f_e = share of routed slots (constant), P_e = mean prob."""
    f = torch.tensor([float((top == e).sum()) / top.numel() for e in range(E)])
    return E * sum(f[e] * probs[:, e].mean() for e in range(E))


def ref_infonce(z, z_hat, tau):
    """-1/N sum_i log softmax_j(cos(z_i, z_hat_j) / tau)[i], written as loops."""
    n = z.shape[0]
    zn = [z[i] / z[i].norm() for i in range(n)]
    hn = [z_hat[j] / z_hat[j].norm() for j in range(n)]
    total = 0.0
    for i in range(n):
        s = torch.stack([zn[i] @ hn[j] / tau for j in range(n)])
        total = total - (s[i] - torch.logsumexp(s, 0))
    return total / n


# ---- Megatron tensor-parallel slices ---------------------------------------------------------
def shard_cols(w, t, tp, swiglu):
    """Columns of TP rank t in w1/b1 (last dim), written independently of s2moe_dist.moe.tp_shards."""
    if tp == 1:
        return w
    if swiglu:
        gate, up = w.chunk(2, dim=-1)
        return torch.cat([gate.chunk(tp, dim=-1)[t], up.chunk(tp, dim=-1)[t]], dim=-1)
    return w.chunk(tp, dim=-1)[t]


def shard_rows(w, t, tp):
    return w.chunk(tp, dim=-2)[t] if tp > 1 else w
