"""The dispatcher's permutation path (no slot dropped) against the general index_select /
index_add path and a per-token loop: outputs and gradients of tokens, weights and expert rows."""
import pytest
import torch

from s2moe_dist.moe.dispatcher import combine, gather_tokens, sort_slots


def _loop_reference(tokens, idx, w, expert):
    return torch.stack([sum(w[t, j] * expert(tokens[t], int(idx[t, j])) for j in range(idx.shape[1]))
                        for t in range(tokens.shape[0])])


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("drop", [False, True])
def test_gather_and_combine_equal_a_loop_with_gradients(k, drop):
    torch.manual_seed(k)
    N, d, E = 37, 8, 5
    tokens = torch.randn(N, d, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    if drop:
        idx[::4, 0] = -1  # dropped slots: the general path
    w = torch.rand(N, k).masked_fill(idx < 0, 0.0).requires_grad_(True)
    scale = torch.randn(E, d)  # "expert" e: row * scale[e]

    slots = sort_slots(idx, w, E)
    assert (slots.inverse is None) == drop
    rows = gather_tokens(tokens, slots)
    expert_of_row = torch.repeat_interleave(torch.arange(E), slots.counts)
    out = combine(rows * scale[expert_of_row], slots, N)
    R = torch.randn(N, d)
    g_tok, g_w = torch.autograd.grad((out * R).sum(), [tokens, w])

    tokens2, w2 = tokens.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = _loop_reference(tokens2, idx, w2, lambda x, e: x * scale[e] if e >= 0 else torch.zeros_like(x))
    r_tok, r_w = torch.autograd.grad((ref * R).sum(), [tokens2, w2])
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_tok, r_tok, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_w, r_w, rtol=1e-6, atol=1e-6)


def test_dropless_path_builds_no_zero_filled_token_buffer():
    """Why the permutation path exists: forward and backward of gather + combine run no
    zeros/index_add on [N, d] (profiled op names)."""
    from torch.profiler import profile
    N, d, E, k = 64, 16, 4, 2
    tokens = torch.randn(N, d, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    w = torch.rand(N, k, requires_grad=True)
    with profile(record_shapes=True) as prof:
        slots = sort_slots(idx, w, E)
        out = combine(gather_tokens(tokens, slots) * 2.0, slots, N)
        out.sum().backward()
    ops = {(e.key, tuple(tuple(s) for s in e.input_shapes if s)) for e in prof.key_averages(group_by_input_shape=True)}
    big = [(name, shapes) for name, shapes in ops if any(s[:1] in ((N,), (N * k,)) and len(s) == 2 and s[1] == d
                                                         for s in shapes)]
    assert not [op for op in big if op[0] in ("aten::index_add", "aten::index_add_", "aten::zeros",
                                              "aten::new_zeros", "aten::scatter_add_", "aten::fill_")], big
