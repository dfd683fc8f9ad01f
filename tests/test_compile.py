"""torch.compile(layer, fullgraph=True) at EP=1: no graph break, and the compiled layer's outputs,
losses and every gradient equal eager's (bf16 and fp32, train and eval, S2MoE and SMoE, k=1,2).

fp32 exercises the grouped GEMM as the project's custom op (aten._grouped_mm's shape kernel takes
only bf16); bf16 keeps aten._grouped_mm in the graph. The matrix runs under the ``aot_eager``
backend: dynamo with fullgraph, fake-tensor shape propagation and AOT autograd's joint
forward/backward graph, without inductor's code generation (minutes per graph on CPU); one slow
test runs inductor itself on an fp32 training step (the custom op through inductor's codegen).
``fallback_random``: inductor's own RNG would draw different noise than eager.
"""
import itertools

import pytest
import torch
import torch._inductor.config as inductor_config

from s2moe_dist.moe import S2MoELayer

D, E, H, T = 16, 8, 32, 24  # aligned for grouped_mm (fp32 and bf16 rows of 16-byte multiples)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOL = {"bf16": 2e-2, "fp32": 1e-5}  # relative to each tensor's max: ~1 bf16 ulp, fp32 rounding


def _layer(moe_type, k, dtype):
    torch.manual_seed(0)
    return S2MoELayer(hidden_size=D, num_experts=E, k=k, ffn_hidden_size=H, moe_type=moe_type).to(dtype)


def _step(layer, module, x, train):
    """Outputs, losses and gradients (input and every parameter) of one forward + backward."""
    layer.train(train)
    for p in layer.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    torch.manual_seed(5)  # the same noise for eager and compiled
    y, l_aux, counts = module(x)
    (y.float().square().sum() + layer.aux_loss()).backward()
    named = {"out": y, "l_aux": l_aux, "uncertainty": layer.uncertainty_loss, "counts": counts, "grad_x": x.grad}
    named.update({f"grad {n}": p.grad for n, p in layer.named_parameters() if p.grad is not None or train})
    return named


def _compare(dtype_name, got, want):
    assert got.keys() == want.keys()
    for name, ref in want.items():
        assert got[name] is not None, name
        err = (got[name].float() - ref.float()).abs().max().item()
        scale = ref.float().abs().max().clamp_min(1e-6).item()
        assert err <= TOL[dtype_name] * scale, f"{name}: max |compiled - eager| = {err:.3g} (scale {scale:.3g})"


@pytest.fixture(autouse=True)
def _eager_random():
    with inductor_config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


QUICK = {("fp32", "s2moe", 2), ("bf16", "smoe", 1)}  # the rest of the matrix: ~10 s each on CPU


@pytest.mark.parametrize("dtype_name, moe_type, k", [
    c if c in QUICK else pytest.param(*c, marks=pytest.mark.slow)
    for c in itertools.product(DTYPES, ("s2moe", "smoe"), (1, 2))])
def test_fullgraph_matches_eager(dtype_name, moe_type, k):
    layer = _layer(moe_type, k, DTYPES[dtype_name])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # one object, train and eval
    x = torch.randn(T, D).to(DTYPES[dtype_name])
    for train in (True, False):
        _compare(dtype_name, _step(layer, compiled, x, train), _step(layer, layer, x, train))


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name, moe_type, k", [("fp32", "s2moe", 2)])
def test_fullgraph_inductor_matches_eager(dtype_name, moe_type, k):
    layer = _layer(moe_type, k, DTYPES[dtype_name])
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(T, D).to(DTYPES[dtype_name])
    _compare(dtype_name, _step(layer, compiled, x, True), _step(layer, layer, x, True))
