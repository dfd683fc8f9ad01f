"""deepspeed.initialize(..., mpu=megatron_mpu()) with S2MoE experts split over Megatron's TP group
(issue 5): TP=2 x EP=2 on 4 gloo ranks (DP=2).

- DeepSpeed builds its expert groups from the mpu (E+M+D layout): they must be the groups the layer
  was laid out for, so each rank keeps the experts (and TP shard) it was given;
- one SGD step under ZeRO 0 and 1 (clipping active) equals one process holding the whole
  model on the mean of the DP ranks' losses (reference: tests/test_deepspeed_engine.py).
Also: megatron-core 0.16's parallel_state itself is not a usable DeepSpeed mpu (why megatron_mpu()
exists), and a TP layer with no mpu fails with a clear error.
"""
import pytest
import torch

from deepspeed_tiny_train import TinyMoEModel, batch, ds_config
from dist_utils import run_distributed
from reference import shard_cols, shard_rows

LR = 0.5
CASES = [(0, 0.05), (1, 0.05)]  # (ZeRO stage, gradient clipping): 0.05 < the grad norm, clipping acts


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _expected(name, value, layer, tp_rank):
    """Slice of a full (single-process) expert tensor this rank holds: its EP block, its TP shard."""
    if ".experts." not in name:
        return value
    value = value[layer.first_expert:layer.first_expert + layer.num_local_experts]
    kind = name.rsplit(".", 1)[1]
    if kind in ("w1", "b1"):
        return shard_cols(value, tp_rank, 2, swiglu=True)
    return shard_rows(value, tp_rank, 2) if kind == "w2" else value


def _body(rank, world):
    import deepspeed
    from deepspeed.utils import groups as ds_groups
    from megatron.core import parallel_state as ps

    from s2moe_dist import S2MoE, S2MoELayer
    from s2moe_dist.integrations.deepspeed import s2moe_param_groups
    from s2moe_dist.integrations.megatron import megatron_mpu, use_megatron_parallel_state
    from s2moe_dist.parallel.tensor_parallel import set_tensor_parallel_group
    from s2moe_dist.parallel.topology import expert_tp_ranks

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    tp_group = use_megatron_parallel_state()
    tp_rank, dp, dp_size = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(), 2
    out = {}
    kw = dict(activation="swiglu", expert_bias=True)

    # a TP layer with no mpu: clear error (before any DeepSpeed group is made)
    lonely = S2MoE(16, num_experts=4, k=2, ffn_hidden_size=32, ep_size=2, enable_expert_tensor_parallelism=True)
    try:
        lonely.set_deepspeed_parallelism()
    except ValueError as e:
        out["no_mpu_error"] = str(e)
    try:  # megatron-core's module as mpu: DeepSpeed calls get_model_parallel_world_size, gone in 0.16
        m = torch.nn.Linear(2, 2)
        deepspeed.initialize(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), config=ds_config(0), mpu=ps)
    except AttributeError as e:
        out["raw_mpu_error"] = str(e)

    for stage, clip in CASES:
        set_tensor_parallel_group(None)  # the reference: one process, no TP, all experts
        torch.manual_seed(0)
        ref = TinyMoEModel(S2MoELayer, ep_size=1, **kw)
        for m in ref.moes:  # the reference averages its loss over ranks by hand: L_u live, inside that mean
            m.attach_uncertainty_grad = False
        set_tensor_parallel_group(tp_group)
        torch.manual_seed(1)
        model = TinyMoEModel(S2MoE, ep_size=2, enable_expert_tensor_parallelism=True, **kw)
        model.load_state_dict(ref.state_dict())  # full checkpoint -> EP block and TP shard of this rank
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(s2moe_param_groups(model), lr=LR),
                                               config=ds_config(stage, clip=clip), mpu=megatron_mpu())
        loss = engine(*batch(dp))
        engine.backward(loss)
        engine.step()
        ref_loss = sum(ref(*batch(d)) for d in range(dp_size)) / dp_size
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), clip if clip else float("inf"))
        moved = dict(engine.module.named_parameters())
        layer = engine.module.moes[0]
        errs = {name: _rel(moved[name].detach(), _expected(name, p.detach() - LR * p.grad, layer, tp_rank))
                for name, p in ref.named_parameters()}
        out[(stage, clip)] = {"errs": errs, "loss": (loss.item(), ref_loss.item())}
    ep_groups, _ = expert_tp_ranks(world, 2, 2)
    out["ep_ranks"] = (list(ds_groups._get_expert_parallel_group_ranks("ep_size_2")),
                       next(g for g in ep_groups if rank in g))
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_body, world_size=4, use_deepspeed=True, timeout=300)


def test_deepspeed_expert_groups_from_megatron_mpu_are_the_layers(results):
    for rank, res in enumerate(results):
        ds_ranks, ours = res["ep_ranks"]
        assert ds_ranks == ours, (rank, ds_ranks, ours)


@pytest.mark.parametrize("stage, clip", CASES)
def test_sgd_step_tp2_ep2_equals_single_process(results, stage, clip):
    for rank, res in enumerate(results):
        got = res[(stage, clip)]
        loss, ref_loss = got["loss"]
        assert abs(loss - ref_loss) < 0.5 * abs(ref_loss)  # own DP rank's loss vs the mean: sanity only
        for name, err in got["errs"].items():
            assert err < 1e-5, f"rank {rank} stage {stage} clip {clip}: {name} rel err {err:.2e}"


def test_errors_without_a_usable_mpu(results):
    for res in results:
        assert res["no_mpu_error"].startswith("the S2MoE layer is tensor-parallel (TP=2) but DeepSpeed got no mpu: "
                                              "pass mpu=s2moe_dist.integrations.megatron.megatron_mpu()")
        assert "get_model_parallel_world_size" in res["raw_mpu_error"]
