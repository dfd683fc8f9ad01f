"""S2MoE on Megatron-core (issue 5): the layer spec, the MLP adapter, a GPTModel with S2MoE layers
on CPU under TP=2 against TP=1, and deepspeed.initialize with Megatron's parallel state as mpu.

Megatron's DotProductAttention allocates on CUDA, so the CPU runs swap in ``CPUCoreAttention``
(plain causal softmax attention, same call); everything else is Megatron's own local spec.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
megatron = pytest.importorskip("megatron.core")

from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from s2moe_dist.integrations.megatron import (S2MoEMLP, get_s2moe_block_spec,  # noqa: E402
                                              get_s2moe_layer_spec)
from s2moe_dist.moe import S2MoELayer  # noqa: E402

HID, HEADS, FFN, VOCAB, SEQ, BATCH = 16, 4, 32, 32, 6, 2
MOE = dict(num_experts=4, k=2, ffn_hidden_size=FFN)


def _config(tp=1, **kw):
    return TransformerConfig(num_layers=2, hidden_size=HID, num_attention_heads=HEADS, ffn_hidden_size=FFN,
                             use_cpu_initialization=True, tensor_model_parallel_size=tp, hidden_dropout=0.0,
                             attention_dropout=0.0, gradient_accumulation_fusion=False, **kw)


class CPUCoreAttention(torch.nn.Module):
    """Causal attention with DotProductAttention's call (the one in Megatron allocates on CUDA)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
        super().__init__()

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dh]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _cpu_base_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = CPUCoreAttention
    return spec


# ---- single process ------------------------------------------------------------------------------
def test_layer_spec_puts_s2moe_in_the_mlp_slot():
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_layer import TransformerLayer
    spec = get_s2moe_layer_spec(MOE)
    assert spec.module is TransformerLayer
    assert spec.submodules.mlp.module is S2MoEMLP
    assert spec.submodules.mlp.params["moe_config"] == MOE
    assert spec.submodules.pre_mlp_layernorm is not IdentityOp
    assert not any(k.startswith("pre_mlp") for k in spec.submodules.sharded_state_dict_keys_map)
    block = get_s2moe_block_spec(4, MOE, moe_every=2)
    kinds = [s.submodules.mlp.module for s in block.layer_specs]
    assert kinds[1] is S2MoEMLP and kinds[3] is S2MoEMLP
    assert kinds[0] is not S2MoEMLP and kinds[2] is not S2MoEMLP
    with pytest.raises(ValueError, match="get_s2moe_block_spec.moe_every=0 is invalid"):
        get_s2moe_block_spec(4, MOE, moe_every=0)


def test_transformer_engine_spec_without_transformer_engine_is_a_clear_error():
    try:
        import transformer_engine  # noqa: F401
        pytest.skip("Transformer Engine is installed (its spec is checked on GPU only)")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="use_transformer_engine=True needs NVIDIA Transformer Engine"):
        get_s2moe_layer_spec(MOE, use_transformer_engine=True)


def test_mlp_adapter_returns_output_and_bias_and_carries_the_aux_loss():
    cfg = _config()
    torch.manual_seed(0)
    mlp = S2MoEMLP(cfg, moe_config=MOE)
    plain = S2MoELayer(hidden_size=HID, **MOE)
    plain.load_state_dict(mlp.moe.state_dict())
    x = torch.randn(SEQ, BATCH, HID)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    out, bias = mlp(xa, padding_mask=None)
    torch.manual_seed(1)
    ref, _, _ = plain(xb)
    assert bias is None and out.shape == (SEQ, BATCH, HID)
    torch.testing.assert_close(out, ref)
    out.sum().backward()  # the aux loss rides along in backward (Megatron's MoEAuxLossAutoScaler)
    (ref.sum() + plain.aux_loss()).backward()
    assert plain.aux_loss().item() > 0
    torch.testing.assert_close(mlp.moe.router.weight.grad, plain.router.weight.grad)
    torch.testing.assert_close(xa.grad, xb.grad)
    mlp.eval()
    with torch.no_grad():
        assert mlp(x)[1] is None


def test_mlp_adapter_errors():
    with pytest.raises(ValueError, match="S2MoEConfig.hidden_size=8 is invalid: the Megatron TransformerConfig "
                                         "has hidden_size=16"):
        S2MoEMLP(_config(), moe_config={**MOE, "hidden_size": 8})
    cfg = _config()
    cfg.sequence_parallel = True  # (TransformerConfig refuses it at TP=1, so set it afterwards)
    with pytest.raises(ValueError, match="sequence_parallel=True is invalid with the S2MoE MLP"):
        S2MoEMLP(cfg, moe_config=MOE)


# ---- GPTModel, TP=2 vs TP=1, on 2 gloo ranks ------------------------------------------------------
def _gpt_loss(tp, shard):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    moe = {**MOE, "enable_expert_tensor_parallelism": shard, "noise_mult_std": 0.5, "noise_add_std": 0.5}
    block = get_s2moe_block_spec(2, moe, moe_every=2, base_spec=_cpu_base_spec())
    torch.manual_seed(0)
    model = GPTModel(config=_config(tp), transformer_layer_spec=block, vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="learned_absolute")
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    torch.manual_seed(2)  # S2MoE noise: identical on the TP ranks
    losses = model(tokens, position_ids, attention_mask=None, labels=tokens.roll(-1, 1))  # [b, s]
    loss = losses.mean()
    loss.backward()
    moe_layer = model.decoder.layers[1].mlp
    emb = model.embedding.word_embeddings.weight.grad  # vocab-parallel: rows of this TP rank
    out = {"loss": loss.item(), "emb_grad": emb.clone(), "router_grad": moe_layer.moe.router.weight.grad.clone(),
           "is_tp": moe_layer.moe.tp_plan is not None, "mlp0": type(model.decoder.layers[0].mlp).__name__}
    ps.destroy_model_parallel()
    return out


def _gpt_body(rank, world):
    return {"tp2_shard": _gpt_loss(2, True), "tp2_whole": _gpt_loss(2, False), "tp1": _gpt_loss(1, True)}


def test_gpt_model_with_s2moe_tp2_matches_tp1():
    results = run_distributed(_gpt_body, world_size=2, timeout=240)
    for rank, res in enumerate(results):
        ref = res["tp1"]
        assert not ref["is_tp"] and ref["mlp0"] == "MLP"
        for name in ("tp2_shard", "tp2_whole"):
            got = res[name]
            assert got["is_tp"], name
            assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (rank, name, got["loss"], ref["loss"])
            torch.testing.assert_close(got["router_grad"], ref["router_grad"], rtol=1e-5, atol=1e-7)
            half = VOCAB // 2  # the word embedding is split by vocabulary rows over TP
            torch.testing.assert_close(got["emb_grad"], ref["emb_grad"][rank * half:(rank + 1) * half],
                                       rtol=1e-5, atol=1e-7)
