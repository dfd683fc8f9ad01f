"""DeepSpeedS2MoE as DeepSpeed sees it (issue 4): type, parameter marking, state-dict layout,
optimizer param groups, config validation, and the errors raised inside deepspeed.initialize."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from deepspeed_tiny_train import TinyMoEModel, batch, ds_config
from dist_utils import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "deepspeed")


def test_public_s2moe_is_a_deepspeed_moe_and_import_stays_light():
    code = ("import sys, s2moe_dist; assert 'deepspeed' not in sys.modules; "
            "from s2moe_dist import S2MoE; import deepspeed.moe.layer as L; "
            "from s2moe_dist.integrations.deepspeed import DeepSpeedS2MoE; "
            "assert S2MoE is DeepSpeedS2MoE and issubclass(S2MoE, L.MoE) and issubclass(S2MoE, s2moe_dist.S2MoELayer); "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("ok"), out.stderr


def test_has_moe_layers_and_engine_attributes():
    from deepspeed.moe.utils import has_moe_layers
    from s2moe_dist import S2MoE
    layer = S2MoE(8, num_experts=4, k=2, ffn_hidden_size=16)
    assert has_moe_layers(nn.Sequential(nn.Linear(8, 8), layer)) == (True, 4)
    got = (layer.expert_group_name, layer.num_experts, layer.num_local_experts, layer.ep_size)
    assert got == ("ep_size_1", 4, 4, 1)
    assert not hasattr(layer, "deepspeed_moe")  # DeepSpeed's gate/experts are never built
    assert len(list(layer.parameters())) == 5


def test_expert_params_marked_like_deepspeed_experts_dense_ones_not():
    from deepspeed.moe.utils import is_moe_param
    from s2moe_dist import S2MoE
    for layer in (S2MoE(8, num_experts=4, k=2, ffn_hidden_size=16, expert_bias=True),
                  S2MoE(8, nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), num_experts=2, k=1)):
        for name, p in layer.named_parameters():
            if name.startswith("experts."):
                assert is_moe_param(p) and p.group_name == "ep_size_1", name
            else:
                assert not is_moe_param(p), name


def test_state_dict_uses_deepspeed_per_expert_keys_and_round_trips():
    from s2moe_dist import S2MoE, S2MoELayer
    from s2moe_dist.integrations.ds_checkpoint import batched_expert_state_dict
    torch.manual_seed(0)
    a = S2MoE(8, num_experts=3, k=2, ffn_hidden_size=16, expert_bias=True)
    sd = a.state_dict()
    pre = "deepspeed_moe.experts.deepspeed_experts."
    assert {k for k in sd if k.startswith(pre)} == {f"{pre}{i}.{n}" for i in range(3) for n in ("w1", "w2", "b1", "b2")}
    assert not any(k.startswith("experts.") for k in sd)
    torch.testing.assert_close(sd[pre + "1.w2"], a.experts.w2[1], rtol=0, atol=0)
    torch.manual_seed(1)
    b = S2MoE(8, num_experts=3, k=2, ffn_hidden_size=16, expert_bias=True)
    b.load_state_dict(sd)
    c = S2MoELayer(8, num_experts=3, k=2, ffn_hidden_size=16, expert_bias=True)
    c.load_state_dict(batched_expert_state_dict(sd))  # DeepSpeed layout -> pure layer
    d = S2MoE(8, num_experts=3, k=2, ffn_hidden_size=16, expert_bias=True)
    d.load_state_dict(c.state_dict())  # pure (batched) layout -> DeepSpeed layer
    for m in (b, c, d):
        for (n, p), q in zip(a.named_parameters(), m.parameters()):
            assert torch.equal(p, q), n


def test_user_expert_module_state_dict_maps_to_deepspeed_keys():
    from s2moe_dist import S2MoE
    torch.manual_seed(0)
    expert = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    a = S2MoE(8, expert, num_experts=2, k=1)
    sd = a.state_dict()
    assert "deepspeed_moe.experts.deepspeed_experts.1.2.weight" in sd  # DeepSpeed MoE's own key form
    b = S2MoE(8, nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), num_experts=2, k=1)
    b.load_state_dict(sd)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_wrong_number_of_experts_in_state_dict_is_a_load_error():
    from s2moe_dist import S2MoE
    sd = S2MoE(8, num_experts=3, k=2, ffn_hidden_size=16).state_dict()
    with pytest.raises(RuntimeError, match=r"holds experts \[0, 1, 2\]; this layer expects its 4 local experts"):
        S2MoE(8, num_experts=4, k=2, ffn_hidden_size=16).load_state_dict(sd)


def test_param_groups_split_named_and_cover_every_parameter_once():
    from deepspeed.moe.utils import is_moe_param
    from s2moe_dist import S2MoE
    from s2moe_dist.integrations.deepspeed import check_param_groups, s2moe_param_groups
    model = TinyMoEModel(S2MoE, expert_bias=True)
    groups = s2moe_param_groups(model, weight_decay=0.1, lr=3e-4)
    by_name = {}
    for g in groups:
        by_name.setdefault(g["name"], []).append(g)
        assert g["lr"] == 3e-4
        if g.get("moe"):
            assert g["name"] == "ep_size_1" and all(is_moe_param(p) for p in g["params"])
        else:
            assert not any(is_moe_param(p) for p in g["params"])
    assert set(by_name) == {"decay", "no_decay", "ep_size_1"}
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    decay = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in decay} == {"inp.weight", "out.weight"} | {
        f"moes.{i}.{n}" for i in range(2) for n in ("router.weight", "gate.weight", "experts.w1", "experts.w2")}
    check_param_groups(groups)
    torch.optim.AdamW(groups)  # a torch optimizer takes them as they are


def test_unsplit_param_groups_error_names_the_fix():
    from s2moe_dist import S2MoE
    from s2moe_dist.integrations.deepspeed import check_param_groups
    model = TinyMoEModel(S2MoE)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"optimizer param group 0 mixes 4 S2MoE expert parameter\(s\) into a "
                                         r"group without 'moe': True.*s2moe_param_groups\(model\)"):
        check_param_groups(opt.param_groups)


# ---- config validation ------------------------------------------------------------------------
def _cfg(name):
    with open(os.path.join(CONFIGS, name)) as f:
        return json.load(f)


def test_shipped_configs_validate_and_use_no_deepspeed_optimizer():
    from s2moe_dist.integrations.deepspeed import validate_deepspeed_config
    names = sorted(n for n in os.listdir(CONFIGS) if n.endswith(".json"))
    assert names == ["zero0_bf16.json", "zero0_fp32.json", "zero1_bf16.json", "zero1_fp32.json",
                     "zero2_bf16.json", "zero2_fp32.json", "zero2_offload.json", "zero3_unsupported.json"]
    for name in names:
        cfg = _cfg(name)
        assert "optimizer" not in cfg, name  # the trainer passes a torch optimizer
        assert cfg["steps_per_print"] >= 10**6 and cfg["gradient_clipping"] > 0
        if name != "zero3_unsupported.json":
            validate_deepspeed_config(cfg, device="cpu")
            validate_deepspeed_config(cfg, device="cuda")


@pytest.mark.parametrize("patch,match", [
    ({"zero_optimization": {"stage": 3}}, r"zero_optimization.stage=3 is invalid with S2MoE layers: DeepSpeed's "
                                          r"native MoE.*not supported under ZeRO stage 3.*stage 1 or 2"),
    ({"zero_optimization": {"stage": 4}}, r"ds_config.zero_optimization.stage=4 is invalid: must be one of"),
    ({"fp16": {"enabled": True}}, r"ds_config.fp16.enabled=True is invalid: DeepSpeed's CPU accelerator has no fp16"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, r"fp16 and bf16 cannot both be enabled"),
    ({"zero_optimization": {"stage": 2, "contiguous_gradients": False}},
     r"zero_optimization.contiguous_gradients=False is invalid: DeepSpeed's ZeRO stage 2 supports MoE only with"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     r"ds_config.zero_force_ds_cpu_optimizer=True is invalid: optimizer offload with a torch optimizer needs"),
    ({"train_micro_batch_size_per_gpu": 0},
     r"ds_config.train_micro_batch_size_per_gpu=0 is invalid: must be an integer >= 1"),
    ({"gradient_clipping": -1.0}, r"ds_config.gradient_clipping=-1.0 is invalid"),
])
def test_validate_deepspeed_config_errors(patch, match):
    from s2moe_dist.integrations.deepspeed import validate_deepspeed_config
    cfg = {**_cfg("zero1_fp32.json"), **patch}
    with pytest.raises(ValueError, match=match):
        validate_deepspeed_config(cfg, device="cpu")


def test_zero3_config_file_is_refused_and_dense_models_may_use_it():
    from s2moe_dist.integrations.deepspeed import validate_deepspeed_config
    with pytest.raises(ValueError, match="not supported under ZeRO stage 3"):
        validate_deepspeed_config(_cfg("zero3_unsupported.json"), device="cpu")
    validate_deepspeed_config(_cfg("zero3_unsupported.json"), model_has_moe=False, device="cpu")


# ---- inside deepspeed.initialize ----------------------------------------------------------------
def _initialize_errors_body(rank, world):
    import deepspeed
    from s2moe_dist import S2MoE
    from s2moe_dist.integrations.deepspeed import s2moe_param_groups
    errors = {}
    cases = {"zero3": (ds_config(3), True), "unsplit_zero1": (ds_config(1), False),
             "unsplit_bf16": (ds_config(0, bf16=True), False)}
    for name, (cfg, split) in cases.items():
        model = TinyMoEModel(S2MoE, ep_size=world)
        params = s2moe_param_groups(model) if split else model.parameters()
        try:
            deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params), config=cfg)
            errors[name] = None
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"
    # ZeRO-0 fp32 reduces expert grads by parameter marking alone: unsplit groups are fine there
    model = TinyMoEModel(S2MoE, ep_size=world)
    deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds_config(0))
    return errors


def test_zero3_and_unsplit_param_groups_fail_inside_deepspeed_initialize():
    errors = run_distributed(_initialize_errors_body, 2, use_deepspeed=True)[0]
    assert errors["zero3"].startswith("ValueError: zero_optimization.stage=3 is invalid with S2MoE layers")
    for name in ("unsplit_zero1", "unsplit_bf16"):
        assert errors[name].startswith("ValueError: optimizer param group 0 mixes 4 S2MoE expert parameter(s)"), errors
        assert "s2moe_param_groups(model)" in errors[name]


# ---- groups ---------------------------------------------------------------------------------------
def _groups_body(rank, world):
    from deepspeed.utils import groups
    from s2moe_dist import S2MoE
    torch.manual_seed(0)  # torch.distributed only: the layer initialises deepspeed.comm itself
    layer = S2MoE(8, num_experts=4, k=2, ffn_hidden_size=16, ep_size=world, noise_mult_std=0.0, noise_add_std=0.0)
    y, _, counts = layer(batch(rank, seed=3)[0][:, :8])  # first forward: no deepspeed.initialize anywhere
    return {"same_group": layer.dispatcher.group is groups._get_expert_parallel_group("ep_size_2"),
            "edp_ranks": list(groups._get_expert_data_parallel_group_ranks("ep_size_2")),
            "ep_rank": layer.ep_rank, "counts": counts.sum().item()}


def test_layer_never_seen_by_an_engine_moves_onto_deepspeed_groups_at_first_forward():
    res = run_distributed(_groups_body, 2)
    for rank, r in enumerate(res):
        assert r["same_group"] and r["ep_rank"] == rank and r["edp_ranks"] == [rank]
