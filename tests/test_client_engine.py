"""S2MoE under ``deepspeed.initialize`` as the clients run it (one gloo rank, DeepSpeed's engine):

- gradient accumulation: the InfoNCE gradient the layer attaches is scaled by the engine like the
  loss (1 / gradient_accumulation_steps); one SGD step equals the reference on the mean of the
  micro-batches' ``task + coeff * l_aux + beta * L_u``;
- the first job of a Megatron-DeepSpeed run: ``--load`` names an empty folder ->
  ``engine.load_checkpoint`` warns and returns ``(None, None)``, as DeepSpeed's does; the offline
  converter keeps its error;
- bf16 (ZeRO 0 and 1): the router weight stays fp32 after ``deepspeed.initialize`` and a step works.
"""
import copy

import pytest
import torch
from torch import nn

from dist_utils import run_distributed

D, LR, COEFF, GAS = 8, 0.5, 0.01, 2


class Net(nn.Module):
    def __init__(self, layer_cls, **kw):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = layer_cls(D, num_experts=4, k=2, ffn_hidden_size=16, **kw)

    def forward(self, x):
        y, l_aux, _ = self.moe(self.inp(x))
        return y, l_aux


def task(y):
    return (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum()


def micro(i):
    return torch.randn(12, D, generator=torch.Generator().manual_seed(100 + i))


def _cfg(stage=0, bf16=False, gas=1):
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": gas, "steps_per_print": 10**9,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True}


def _body(rank, world, empty_dir):
    import deepspeed
    from s2moe_dist import S2MoE
    from s2moe_dist.integrations.deepspeed import s2moe_param_groups
    from s2moe_dist.integrations.reshard import reshard_checkpoint
    out = {}

    # gradient accumulation over 2 micro-batches, client loss task + coeff * l_aux
    torch.manual_seed(0)
    model = Net(S2MoE)
    ref = copy.deepcopy(model)  # the same layer, never seen by an engine
    ref.moe.attach_uncertainty_grad = False
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(s2moe_param_groups(model), lr=LR),
                                           config=_cfg(gas=GAS))
    for i in range(GAS):
        torch.manual_seed(50 + i)
        y, l_aux = engine(micro(i))
        engine.backward(task(y) + COEFF * l_aux)
        engine.step()
    for i in range(GAS):
        torch.manual_seed(50 + i)
        y, l_aux = ref(micro(i))
        ((task(y) + COEFF * l_aux + ref.moe.config.uncertainty_coef * ref.moe.uncertainty_loss) / GAS).backward()
    got = dict(engine.module.named_parameters())
    out["gas_errs"] = {n: float((got[n].detach() - (p.detach() - LR * p.grad)).abs().max())
                       for n, p in ref.named_parameters()}
    out["gas_moved"] = float((got["moe.router.weight"] - ref.moe.router.weight).detach().abs().max())

    # empty --load folder (first job)
    out["empty_load"] = engine.load_checkpoint(empty_dir)
    try:
        reshard_checkpoint(empty_dir, empty_dir + "-out", 2)
    except ValueError as e:
        out["reshard_error"] = str(e)

    # bf16: fp32 router, a step
    for stage in (0, 1):
        torch.manual_seed(0)
        m = Net(S2MoE)
        before = m.moe.router.weight.detach().clone()
        eng, _, _, _ = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(s2moe_param_groups(m), lr=1e-2),
                                            config=_cfg(stage, bf16=True))
        layer = eng.module.moe
        dtypes = (layer.router.weight.dtype, layer.experts.w1.dtype, eng.module.inp.weight.dtype)
        y, l_aux = eng(micro(0).bfloat16())
        loss = task(y.float()) + COEFF * l_aux
        eng.backward(loss)
        eng.step()
        out[("bf16", stage)] = {"dtypes": dtypes, "loss": float(loss),
                                "router_moved": float((layer.router.weight.float() - before).abs().max()),
                                "router_dtype_after": layer.router.weight.dtype}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty_load")
    return run_distributed(_body, world_size=1, args=(str(empty),), use_deepspeed=True, timeout=300)[0]


def test_gradient_accumulation_scales_the_attached_infonce_gradient_like_the_loss(results):
    assert results["gas_moved"] > 1e-4  # the step did something
    for name, err in results["gas_errs"].items():
        assert err < 1e-5, (name, err)


def test_empty_load_folder_starts_like_deepspeed(results):
    assert results["empty_load"] == (None, None)
    assert "no tag given and no 'latest' file" in results["reshard_error"]


@pytest.mark.parametrize("stage", [0, 1])
def test_router_stays_fp32_under_deepspeed_bf16(results, stage):
    got = results[("bf16", stage)]
    assert got["dtypes"] == (torch.float32, torch.bfloat16, torch.bfloat16)
    assert got["router_dtype_after"] == torch.float32
    assert torch.isfinite(torch.tensor(got["loss"])) and got["router_moved"] > 0
