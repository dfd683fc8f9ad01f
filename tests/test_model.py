"""The character LM: shapes, gradients, causality, attention vs a hand-written reference,
smoe/s2moe sharing one code path, the loss helper, config errors, the linear factory."""
import math

import pytest
import torch

from s2moe_dist.model import CharLM, ModelConfig, lm_loss, set_linear_factory
from s2moe_dist.model.attention import CausalSelfAttention, Rotary
from s2moe_dist.moe.layer import S2MoELayer, s2moe_aux_loss

V = 27


def tiny(**kw):
    moe = {"num_experts": 4, "k": 2, "ffn_hidden_size": 64, **kw.pop("moe", {})}
    base = {"vocab_size": V, "seq_len": 32, "n_layers": 2, "d_model": 32, "n_heads": 4}
    return ModelConfig(**{**base, **kw}, moe=moe)


@pytest.mark.parametrize("pos", ["learned", "rotary"])
@pytest.mark.parametrize("tie", [True, False])
def test_forward_backward_shapes(pos, tie):
    torch.manual_seed(0)
    model = CharLM(tiny(pos_encoding=pos, tie_embeddings=tie, moe_every=2))
    x = torch.randint(0, V, (3, 32))
    logits = model(x)
    assert logits.shape == (3, 32, V)
    parts = lm_loss(model, logits, x)
    parts.total.backward()
    assert [i for i, _ in model.moe_layers()] == [1]  # moe_every=2: blocks 1, 3, ...
    assert isinstance(model.blocks[0].ffn, torch.nn.Module) and not model.blocks[0].is_moe
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert (model.head.weight is model.tok_emb.weight) == tie


@pytest.mark.parametrize("moe_type", ["s2moe", "smoe"])
@pytest.mark.parametrize("pos", ["learned", "rotary"])
def test_future_tokens_do_not_change_past_logits(moe_type, pos):
    torch.manual_seed(1)
    model = CharLM(tiny(pos_encoding=pos, moe={"moe_type": moe_type}))
    x = torch.randint(0, V, (2, 32))
    x2 = x.clone()
    x2[:, 20:] = (x2[:, 20:] + 5) % V
    for train in (False, True):  # train: noise drawn with the same seed for both inputs
        model.train(train)
        torch.manual_seed(7)
        a = model(x)
        torch.manual_seed(7)
        b = model(x2)
        torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-5)
        assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3  # the change does reach later positions


def _reference_attention(x, attn: CausalSelfAttention, rotary: bool):
    """Plain attention: explicit mask + softmax; RoPE via complex rotation of (x_i, x_{i+hd/2})."""
    B, T, d = x.shape
    hd = attn.head_dim
    H = d // hd
    qkv = x @ attn.qkv.weight.t() + attn.qkv.bias
    qkv = qkv.view(B, T, H, 3, hd)
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # [B, T, H, hd]
    if rotary:
        theta = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        rot = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64),
                          torch.arange(T, dtype=torch.float64)[:, None] * theta[None, :])

        def rope(t):
            c = torch.complex(t[..., : hd // 2].double(), t[..., hd // 2:].double()) * rot[None, :, None, :]
            return torch.cat([c.real, c.imag], dim=-1).float()
        q, k = rope(q), rope(k)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, d)
    return out @ attn.proj.weight.t() + attn.proj.bias


@pytest.mark.parametrize("rotary", [False, True])
def test_attention_matches_reference(rotary):
    torch.manual_seed(2)
    attn = CausalSelfAttention(32, 4, 0.0, Rotary(8, 16) if rotary else None)
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(attn(x), _reference_attention(x, attn, rotary), rtol=1e-4, atol=1e-5)


def test_smoe_and_s2moe_share_one_code_path():
    torch.manual_seed(3)
    s2 = CharLM(tiny(moe={"moe_type": "s2moe", "noise_mult_std": 0.0, "noise_add_std": 0.0}))
    sm = CharLM(tiny(moe={"moe_type": "smoe"}))
    for m in (s2, sm):
        assert all(type(layer) is S2MoELayer or isinstance(layer, S2MoELayer) for _, layer in m.moe_layers())
    # the same weights: s2moe has exactly the gate's parameters on top of smoe's
    missing, unexpected = s2.load_state_dict(sm.state_dict(), strict=False)
    assert not unexpected and missing and all(".gate." in k for k in missing)
    x = torch.randint(0, V, (2, 32))
    # with zero noise x_hat = x: y = g SMoE(x) + (1 - g) SMoE(x) = SMoE(x) in training too
    s2.train(), sm.train()
    torch.testing.assert_close(s2(x), sm(x), rtol=1e-5, atol=1e-5)
    # eval "clean": one stream, no gate, whatever the noise knobs
    s2n = CharLM(tiny(moe={"moe_type": "s2moe"}))
    s2n.load_state_dict(s2.state_dict())
    s2n.eval(), sm.eval()
    torch.testing.assert_close(s2n(x), sm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("moe_type", ["s2moe", "smoe"])
def test_lm_loss_parts(moe_type):
    torch.manual_seed(4)
    model = CharLM(tiny(moe={"moe_type": moe_type, "balance_coef": 0.05, "uncertainty_coef": 0.2}))
    x = torch.randint(0, V, (2, 32))
    y = torch.randint(0, V, (2, 32))
    logits = model(x)
    parts = lm_loss(model, logits, y)
    ref_task = -logits.log_softmax(-1).gather(-1, y[..., None]).mean()
    torch.testing.assert_close(parts.task, ref_task)
    layers = [layer for _, layer in model.moe_layers()]
    torch.testing.assert_close(parts.balance, 0.05 * sum(layer.l_aux for layer in layers))
    torch.testing.assert_close(parts.uncertainty, 0.2 * sum(layer.uncertainty_loss for layer in layers))
    torch.testing.assert_close(parts.total, parts.task + s2moe_aux_loss(model))
    torch.testing.assert_close(parts.total, parts.task + parts.balance + parts.uncertainty)
    assert parts.balance > 0
    assert (parts.uncertainty > 0) == (moe_type == "s2moe")


def test_dense_only_model_has_no_aux_loss():
    model = CharLM(tiny(moe_every=0))
    x = torch.randint(0, V, (1, 8))
    parts = lm_loss(model, model(x), x)
    assert model.moe_layers() == [] and parts.balance == 0 and parts.uncertainty == 0
    assert parts.total == parts.task


@pytest.mark.parametrize("kw,message", [
    ({"n_heads": 3}, "model.n_heads=3 is invalid: must divide d_model (32)"),
    ({"pos_encoding": "alibi"}, "model.pos_encoding='alibi' is invalid: must be one of ['learned', 'rotary']"),
    ({"moe": {"k": 5}}, "model.moe.k=5 is invalid: must be <= num_experts (4)"),
    ({"moe": {"moe_type": "xmoe"}}, "model.moe.moe_type='xmoe' is invalid: must be one of ['s2moe', 'smoe']"),
    ({"moe": {"hidden_size": 8}}, "model.moe.hidden_size=8 is invalid: is set by model.d_model"),
    ({"dropout": 1.0}, "model.dropout=1.0 is invalid: must be in [0, 1)"),
    ({"tie_embeddings": "yes"}, "model.tie_embeddings='yes' is invalid: must be true or false"),
])
def test_config_errors_name_the_field(kw, message):
    with pytest.raises(ValueError) as e:
        tiny(**kw)
    assert str(e.value).startswith(message)


def test_sequence_longer_than_seq_len_is_refused():
    model = CharLM(tiny())
    with pytest.raises(ValueError, match="exceeds model.seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_linear_factory_builds_every_dense_layer():
    calls = []

    def factory(i, o, *, bias, parallel):
        calls.append((i, o, parallel))
        return torch.nn.Linear(i, o, bias=bias)
    prev = set_linear_factory(factory)
    try:
        CharLM(tiny(moe_every=2))
    finally:
        set_linear_factory(prev)
    d, ff = 32, 128
    per_block = [(d, 3 * d, "column"), (d, d, "row")]
    expected = per_block + [(d, ff, "column"), (ff, d, "row")] + per_block + [(d, V, None)]
    assert calls == expected
