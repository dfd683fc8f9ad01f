"""Declared interfaces of the layer and its config: the run config's typed ``model.moe`` and
errors naming the full field path, DeepSpeed's call conventions in their adapter, the LM's layer
class chosen explicitly (state-dict keys independent of DeepSpeed being installed), the Router
base every router implements, the routing-stats dataclass, and ``forward(x, k=...)``."""
import inspect
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from s2moe_dist.config import S2MoEConfig
from s2moe_dist.model import CharLM, ModelConfig
from s2moe_dist.moe.layer import S2MoELayer
from s2moe_dist.moe.router import Router, Routing
from s2moe_dist.moe.router_variants import ROUTER_TYPES, build_router
from s2moe_dist.moe.stats import RoutingStats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=11, seq_len=8, n_layers=2, d_model=16, n_heads=2,
            moe={"num_experts": 4, "k": 2, "ffn_hidden_size": 32})


# ---- config: owner names, typed model.moe --------------------------------------------------------
@pytest.mark.parametrize("fields, fragment", [
    ({"k": 0}, "model.moe.k=0 is invalid: must be an integer >= 1"),
    ({"num_experts": 6, "ep_size": 4}, "model.moe.num_experts=6 is invalid: must be divisible by ep_size (4)"),
    ({"use_tutel": True}, "model.moe.use_tutel=True is invalid"),
    ({"noisy_gate_policy": "Gumbel"}, "model.moe.noisy_gate_policy='Gumbel' is invalid"),
    ({"nope": 1}, "model.moe: unknown field(s) ['nope']"),
])
def test_layer_config_errors_name_the_owner_given(fields, fragment):
    with pytest.raises(ValueError) as direct:
        S2MoEConfig.from_dict(fields, "model.moe", hidden_size=8)
    assert fragment in str(direct.value) and "S2MoEConfig" not in str(direct.value)
    with pytest.raises(ValueError) as nested:
        ModelConfig(**{**TINY, "moe": fields})
    assert str(nested.value) == str(direct.value)


def test_owner_defaults_to_the_class_name_and_is_not_a_field():
    with pytest.raises(ValueError, match=r"^S2MoEConfig\.k=0 is invalid"):
        S2MoEConfig(hidden_size=8, k=0)
    with pytest.raises(ValueError, match=r"^layers\.3\.k=0 is invalid"):
        S2MoEConfig(hidden_size=8, k=0, owner="layers.3")
    import dataclasses
    assert "owner" not in {f.name for f in dataclasses.fields(S2MoEConfig)}


def test_topology_errors_name_the_callers_fields():
    from s2moe_dist.parallel.topology import validate_topology
    from s2moe_dist.train.config import TOPOLOGY_FIELDS
    with pytest.raises(ValueError, match=r"^model\.moe\.ep_size=3 is invalid: it must divide the world size \(4\)"):
        validate_topology(4, 1, 3, 6, 16, 32, field_names=TOPOLOGY_FIELDS)
    with pytest.raises(ValueError, match=r"^model\.d_model=15 is invalid: it must be divisible by tp_size \(2\)"):
        validate_topology(4, 2, 1, 4, 15, 32, field_names=TOPOLOGY_FIELDS)
    with pytest.raises(ValueError, match=r"^ep_size=3 is invalid"):  # no names given: the argument's
        validate_topology(4, 1, 3, 6, 16, 32)


def test_model_moe_is_one_typed_config_that_round_trips():
    cfg = ModelConfig(**TINY)
    assert isinstance(cfg.moe, S2MoEConfig) and cfg.moe.hidden_size == 16 and cfg.moe.num_experts == 4
    assert cfg.moe_config() is cfg.moe  # the former accessor, no rebuild
    data = cfg.to_dict()
    assert "hidden_size" not in data["moe"] and data["moe"]["ffn_hidden_size"] == 32
    from s2moe_dist.model.config import model_config_from_dict
    assert model_config_from_dict(data) == cfg
    # an S2MoEConfig is accepted as it is when its width is d_model, refused by name otherwise
    assert ModelConfig(**{**TINY, "moe": cfg.moe}).moe is cfg.moe
    with pytest.raises(ValueError, match=r"^model\.moe\.hidden_size=8 is invalid: is set by model\.d_model"):
        ModelConfig(**{**TINY, "moe": S2MoEConfig(hidden_size=8, num_experts=4)})


def test_an_older_checkpoints_partial_moe_section_compares_with_defaults_filled():
    from s2moe_dist.model.config import saved_moe_fields
    mine = ModelConfig(**TINY).to_dict()
    older = {**mine, "moe": dict(TINY["moe"])}  # written before the typed config: only the fields set
    assert saved_moe_fields(older) == mine["moe"]
    assert saved_moe_fields({**mine, "moe": {"k": 0}}) == {"k": 0}  # no longer valid: as saved


# ---- DeepSpeed's call conventions in their adapter -------------------------------------------------
def test_deepspeed_call_conventions_live_in_the_adapter():
    from s2moe_dist import deepspeed_args
    from s2moe_dist.moe import layer as layer_mod
    assert layer_mod.DEEPSPEED_DEFAULTS is deepspeed_args.DEEPSPEED_DEFAULTS  # old import path kept
    cfg, expert = deepspeed_args.layer_config_from_args(8, nn.Linear(8, 8), 4, 1, 2)
    assert isinstance(expert, nn.Linear)
    assert (cfg.num_experts, cfg.ep_size, cfg.k) == (4, 1, 2)
    assert all(getattr(cfg, name) == value for name, value in deepspeed_args.DEEPSPEED_DEFAULTS.items()
               if name not in ("num_experts", "k"))
    cfg, expert = deepspeed_args.layer_config_from_args(8, 4, 1)  # S2MoE's order: num_experts, k
    assert expert is None and (cfg.num_experts, cfg.k, cfg.drop_tokens) == (4, 1, False)
    assert S2MoEConfig(hidden_size=8, noisy_gate_policy="None").noisy_gate_policy is None


# ---- the LM's layer class -------------------------------------------------------------------------
_KEYS_WITHOUT_DEEPSPEED = """
import sys, torch
sys.modules["deepspeed"] = None  # import deepspeed raises ModuleNotFoundError
import s2moe_dist
from s2moe_dist.model import CharLM, ModelConfig
assert s2moe_dist.S2MoE is s2moe_dist.S2MoELayer
model = CharLM(ModelConfig(**%r))
print(",".join(model.state_dict()))
""" % (TINY,)


def test_lm_state_dict_keys_do_not_depend_on_deepspeed_being_installed():
    pytest.importorskip("deepspeed")
    import s2moe_dist
    assert s2moe_dist.S2MoE is not S2MoELayer  # here DeepSpeed is installed: S2MoE is its subclass
    with_ds = list(CharLM(ModelConfig(**TINY)).state_dict())
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _KEYS_WITHOUT_DEEPSPEED], capture_output=True, text=True,
                         env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    without_ds = out.stdout.strip().splitlines()[-1].split(",")
    assert with_ds == without_ds
    assert "blocks.1.ffn.moe.experts.w1" in with_ds


def test_lm_layer_class_is_explicit():
    ds = pytest.importorskip("s2moe_dist.integrations.deepspeed")
    plain = [type(m) for _, m in CharLM(ModelConfig(**TINY)).moe_layers()]
    assert plain == [S2MoELayer, S2MoELayer]
    model = CharLM(ModelConfig(**TINY), moe_layer_cls=ds.DeepSpeedS2MoE)
    assert all(type(m) is ds.DeepSpeedS2MoE for _, m in model.moe_layers())
    layers = [m for _, m in model.moe_layers()]
    assert layers[0].config == ModelConfig(**TINY).moe and layers[0].config is not layers[1].config
    with pytest.raises(ValueError, match="moe_layer_cls=<class 'torch.nn.modules.linear.Linear'>"):
        CharLM(ModelConfig(**TINY), moe_layer_cls=nn.Linear)


# ---- routers ----------------------------------------------------------------------------------------
def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


ROUTER_CONFIGS = [dict(router_type=t) for t in ROUTER_TYPES] + \
    [dict(noisy_gate_policy="Jitter"), dict(noisy_gate_policy="RSample", k=1)]


@pytest.mark.parametrize("fields", ROUTER_CONFIGS, ids=lambda f: "-".join(map(str, f.values())))
def test_every_router_implements_the_base(fields):
    cfg = S2MoEConfig(hidden_size=8, num_experts=4, **{"k": 2, **fields})
    router = build_router(cfg)
    assert isinstance(router, Router)
    x = torch.randn(6, 8)
    router.train()
    router.step()
    for options in ({}, {"capacity_factor": 1.0, "min_capacity": 1}):
        r = router(x, cfg.k, cfg.renormalize, **options)
        assert isinstance(r, Routing) and r.expert_idx.shape == (6, cfg.k) and r.weights.shape == (6, cfg.k)
        loss = router.balance_loss(r)
        assert loss.shape == () and torch.isfinite(loss)
    assert isinstance(router.routes_streams_jointly, bool)


def test_router_base_is_abstract_and_every_subclass_defines_forward():
    with pytest.raises(TypeError):
        Router(4)
    concrete = [c for c in _all_subclasses(Router) if not inspect.isabstract(c)]
    assert {c.__name__ for c in concrete} >= {"TopKRouter", "XMoERouter", "StableMoERouter", "NoisyGateRouter"}
    for cls in concrete:
        assert "forward" not in getattr(cls, "__abstractmethods__", ())
    # two-stream routing in one call only where a per-stream call could not differ
    from s2moe_dist.moe.noisy_gate import NoisyGateRouter
    from s2moe_dist.moe.router import TopKRouter
    assert TopKRouter.routes_streams_jointly and not NoisyGateRouter.routes_streams_jointly


# ---- layer: stats, k per call, stream routing ------------------------------------------------------
def _layer(**kw):
    torch.manual_seed(0)
    return S2MoELayer(hidden_size=8, num_experts=4, k=2, ffn_hidden_size=16, **kw)


def test_routing_stats_dataclass_and_its_read_only_view():
    layer = _layer()
    assert layer.stats is None and dict(layer.last_stats) == {}
    layer.train()
    layer(torch.randn(10, 8))
    assert isinstance(layer.stats, RoutingStats)
    view = layer.last_stats
    assert set(view) == {"expert_counts", "drop_fraction", "gate_mean"}
    assert torch.equal(view["expert_counts"], layer.stats.expert_counts) and int(view["expert_counts"].sum()) == 40
    with pytest.raises(TypeError):
        view["drop_fraction"] = 1.0


def test_forward_k_equals_the_eval_k_path_and_leaves_the_config_alone():
    from s2moe_dist.train.evaluate import eval_k_set
    layer = _layer()
    x = torch.randn(10, 8)
    layer.eval()
    layer.config.eval_k = 1
    with torch.no_grad():
        old_path = layer(x)[0]
    layer.config.eval_k = 2
    with torch.no_grad():
        per_call, two = layer(x, k=1)[0], layer(x)[0]
    assert torch.equal(per_call, old_path) and not torch.equal(two, old_path)
    assert layer.config.eval_k == 2
    model = nn.Sequential(layer)
    with eval_k_set(model, 1), torch.no_grad():
        assert layer.config.eval_k == 2  # the validated config is not touched
        assert torch.equal(layer(x)[0], old_path)
    with pytest.raises(ValueError, match=r"forward\(k=5\) is invalid: must be an integer in \[1, num_experts=4\]"):
        layer(x, k=5)


def test_two_stream_routing_names_a_shared_routing():
    x = torch.randn(5, 8)
    tokens = torch.cat([x, x + 0.1])
    shared = _layer(noisy_routing="shared")._route_two_streams(tokens, 5, 2)
    assert shared.shared and shared.noisy is shared.clean and shared.joint is None
    assert torch.equal(shared.dispatch_idx, shared.clean.dispatch_idx.repeat(2, 1))
    own = _layer()._route_two_streams(tokens, 5, 2)
    assert not own.shared and own.joint is not None and own.dispatch_idx.shape == (10, 2)
    capacity = _layer(drop_tokens=True)._route_two_streams(tokens, 5, 2)
    assert not capacity.shared and capacity.joint is None
