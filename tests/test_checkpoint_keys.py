"""The expert key scheme (s2moe_dist.checkpoint.keys) against hand-written names: build and parse
round trips for dense, bank (EP-local), user-module and DeepSpeed per-expert keys, the canonical
global names of an EP rank's parameters, DeepSpeed's file names with TP ranks, and the errors for
malformed keys."""
import pytest

from s2moe_dist.checkpoint import keys
from s2moe_dist.checkpoint.keys import ExpertKey, ExpertKeyError, Layout

L = "blocks.1.ffn.moe."
PARSED = [
    (f"{L}experts.w1", ExpertKey(L, Layout.BANK, "w1")),
    ("experts.b2", ExpertKey("", Layout.BANK, "b2")),
    (f"{L}experts.experts.3.0.weight", ExpertKey(L, Layout.MODULE, "0.weight", 3)),
    (f"{L}deepspeed_moe.experts.deepspeed_experts.5.w2", ExpertKey(L, Layout.DEEPSPEED, "w2", 5)),
    ("deepspeed_moe.experts.deepspeed_experts.12.2.bias", ExpertKey("", Layout.DEEPSPEED, "2.bias", 12)),
]


@pytest.mark.parametrize("name, want", PARSED, ids=[n for n, _ in PARSED])
def test_parse_and_build_round_trip(name, want):
    got = keys.parse_expert_key(name)
    assert got == want
    assert got.name == name


def test_builders_write_the_documented_names():
    assert keys.bank_key(L, "w1") == "blocks.1.ffn.moe.experts.w1"
    assert keys.module_key(L, 2, "fc.weight") == "blocks.1.ffn.moe.experts.experts.2.fc.weight"
    assert keys.deepspeed_key(L, 7, "b1") == "blocks.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.7.b1"
    assert ExpertKey(L, Layout.DEEPSPEED, "w1", 7).sibling("w2") == \
        "blocks.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.7.w2"
    assert ExpertKey("", Layout.OWN, "w1").sibling("w2") == "w2"


@pytest.mark.parametrize("name", ["blocks.1.attn.qkv.weight", f"{L}router.weight", f"{L}router.expert_embeddings",
                                  f"{L}shared_experts.w1", "decoder.layers.0.mlp.experts.weight1",
                                  "mlp.experts.local_experts.0.linear_fc1.weight", "w1"])
def test_dense_router_and_other_frameworks_keys_are_no_expert_keys(name):
    assert keys.parse_expert_key(name) is None
    assert not keys.is_bank_key(name)


def test_bank_tensor_keys_in_every_layout_and_the_biases():
    assert keys.parse_bank_tensor_key("w1") == ExpertKey("", Layout.OWN, "w1")
    assert keys.parse_bank_tensor_key(f"{L}experts.b1") == ExpertKey(L, Layout.BANK, "b1")
    assert keys.parse_bank_tensor_key(f"{L}deepspeed_moe.experts.deepspeed_experts.0.w2").layout is Layout.DEEPSPEED
    assert keys.parse_bank_tensor_key(f"{L}deepspeed_moe.experts.deepspeed_experts.0.0.weight") is None
    assert keys.parse_bank_tensor_key(f"{L}experts.experts.0.w1") is None  # a user module's w1
    assert keys.is_bank_key(f"{L}experts.w2") and keys.is_bank_bias(f"{L}experts.b2")
    assert not keys.is_bank_bias(f"{L}experts.w1") and not keys.is_bank_bias(f"{L}fc.b1")


def test_ep_rank_parameters_to_global_deepspeed_names():
    """EP rank 1 of 2, 2 local experts: local 0, 1 are global 2, 3."""
    bank = keys.parse_expert_key(f"{L}experts.w1")
    assert keys.to_deepspeed(bank, first_expert=2, n_local=2) == [
        ("blocks.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.2.w1", 0),
        ("blocks.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.3.w1", 1)]
    module = keys.parse_expert_key(f"{L}experts.experts.1.0.weight")
    assert keys.to_deepspeed(module, first_expert=2, n_local=2) == [
        ("blocks.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.3.0.weight", None)]
    with pytest.raises(ExpertKeyError, match="is not a layer's expert parameter"):
        keys.to_deepspeed(keys.parse_expert_key(f"{L}deepspeed_moe.experts.deepspeed_experts.3.w1"), 0, 1)


def test_deepspeed_file_names_with_tp_ranks():
    assert keys.model_file(0) == "mp_rank_00_model_states.pt"
    assert keys.model_file(1) == "mp_rank_01_model_states.pt"
    assert keys.expert_file(2, 13, tp_rank=1) == "layer_2_expert_13_mp_rank_01_model_states.pt"
    assert keys.parse_expert_file("layer_2_expert_13_mp_rank_01_model_states.pt") == (2, 13, 1)
    assert keys.parse_expert_file("mp_rank_00_model_states.pt") is None
    assert keys.zero0_optim_file(3) == "expp_rank_3_mp_rank_00_optim_states.pt"
    assert keys.parse_zero0_optim_file("expp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert keys.zero12_optim_file(5, bf16=True) == "bf16_zero_pp_rank_5_mp_rank_00_optim_states.pt"
    assert keys.parse_zero12_optim_file("bf16_zero_pp_rank_5_mp_rank_00_optim_states.pt") == 5
    assert keys.parse_zero12_optim_file("zero_pp_rank_0_mp_rank_00_optim_states.pt") == 0
    assert keys.parse_zero12_optim_file("expp_rank_3_mp_rank_00_optim_states.pt") is None
    assert keys.ep_group_name(4) == "ep_size_4" and keys.parse_ep_group_name("ep_size_4") == 4


def test_the_expert_word_is_hidden_from_deepspeed_and_restored():
    assert keys.hide_expert_word("router.expert_embeddings") == "router.Expert_embeddings"
    assert keys.unhide_expert_word("router.Expert_embeddings") == "router.expert_embeddings"
    assert keys.has_hidden_expert_word("router.Expert_centroids") and not keys.has_hidden_expert_word("router.weight")


@pytest.mark.parametrize("name, message", [
    (f"{L}deepspeed_moe.experts.deepspeed_experts.x.w1",
     "expert key 'blocks.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.x.w1' is malformed: expected "
     "<layer>.deepspeed_moe.experts.deepspeed_experts.<expert id>.<param>"),
    (f"{L}deepspeed_moe.experts.deepspeed_experts.3",
     "expert key 'blocks.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.3' is malformed"),
    (f"{L}experts.experts.w1",
     "expert key 'blocks.1.ffn.moe.experts.experts.w1' is malformed: expected "
     "<layer>.experts.experts.<local id>.<path>"),
    (f"{L}experts.experts.2", "expert key 'blocks.1.ffn.moe.experts.experts.2' is malformed"),
])
def test_malformed_expert_keys_are_errors_that_name_the_key_and_the_form(name, message):
    with pytest.raises(ExpertKeyError) as e:
        keys.parse_expert_key(name)
    assert str(e.value).startswith(message), str(e.value)
    assert isinstance(e.value, ValueError)


def test_malformed_group_name_is_an_error():
    with pytest.raises(ExpertKeyError, match="expert param group name 'experts' is malformed: expected ep_size_<n>"):
        keys.parse_ep_group_name("experts")


def test_a_deepspeed_trained_single_linear_expert_loads_into_the_pure_layer():
    """A user expert module whose parameters sit at its top (nn.Linear: ``weight``, ``bias``) is a
    module expert, not a bank tensor: ``batched_expert_state_dict`` keeps one module per expert."""
    import torch
    from torch import nn

    from s2moe_dist import S2MoE, S2MoELayer
    from s2moe_dist.checkpoint.state_dict import batched_expert_state_dict
    torch.manual_seed(0)
    a = S2MoE(8, nn.Linear(8, 8), num_experts=2, k=1)
    sd = batched_expert_state_dict(a.state_dict())
    assert "experts.experts.1.weight" in sd and "experts.weight" not in sd
    b = S2MoELayer(8, nn.Linear(8, 8), num_experts=2, k=1)
    b.load_state_dict(sd)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
