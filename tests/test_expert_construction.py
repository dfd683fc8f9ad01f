"""Expert construction under any default device, and grouped_mm's alignment check.

- ``with torch.device('meta')``: every router and layer type builds, all tensors on meta.
- ``ExpertBank.reset_parameters`` under a default device other than the parameters' (meta here,
  CUDA on a GPU node): every random fill uses a generator of the filled tensor's device, and the
  values equal a plain CPU construction's (the same experts whatever the device).
- A buffer whose base address is not 16-byte aligned is refused by the fast path (CUDA's
  grouped_mm raises on it) and takes the per-expert fallback, with the same result.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from s2moe_dist.moe import S2MoELayer
from s2moe_dist.moe.experts import ExpertBank, _aligned

KW = dict(hidden_size=16, num_experts=4, k=2, ffn_hidden_size=32)


@pytest.mark.parametrize("router_type", ["topk", "xmoe", "stablemoe"])
@pytest.mark.parametrize("moe_type", ["s2moe", "smoe"])
def test_builds_on_meta(router_type, moe_type):
    with torch.device("meta"):
        layer = S2MoELayer(moe_type=moe_type, router_type=router_type, **KW)
    devices = {t.device.type for t in list(layer.parameters()) + list(layer.buffers())}
    assert devices == {"meta"}


class _RandomFills(TorchDispatchMode):
    """Records (filled tensor's device, generator's device) of every random fill with a generator."""

    def __init__(self):
        super().__init__()
        self.fills = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gen = kwargs.get("generator")
        if gen is not None and args and isinstance(args[0], torch.Tensor):
            self.fills.append((args[0].device.type, gen.device.type))
        return func(*args, **kwargs)


@pytest.mark.parametrize("activation, tp", [("gelu", 1), ("swiglu", 2)])
def test_reset_parameters_ignores_the_default_device(activation, tp):
    torch.manual_seed(3)
    want = ExpertBank(2, 16, 32, activation, first_expert=2, tp_size=tp, tp_rank=tp - 1)
    bank = ExpertBank(2, 16, 32, activation, first_expert=2, tp_size=tp, tp_rank=tp - 1)
    torch.manual_seed(3)
    with torch.device("meta"), _RandomFills() as fills:
        bank.reset_parameters(first_expert=2)
    assert fills.fills and all(t == g for t, g in fills.fills), fills.fills
    torch.testing.assert_close(bank.w1, want.w1, rtol=0, atol=0)
    torch.testing.assert_close(bank.w2, want.w2, rtol=0, atol=0)


def test_misaligned_base_address_takes_the_fallback():
    aligned = torch.zeros(64).view(4, 16)
    shifted = torch.zeros(65)[1:].view(4, 16)  # rows of 64 bytes, base 4 bytes off
    assert _aligned(aligned) and not _aligned(shifted)

    torch.manual_seed(0)
    bank = ExpertBank(2, 16, 32, "gelu")
    x, counts = torch.randn(10, 16), torch.tensor([4, 6])
    want = bank(x, counts)
    buf = torch.empty(x.numel() + 1)[1:].view_as(x)
    buf.copy_(x)
    assert buf.data_ptr() % 16
    torch.testing.assert_close(bank(buf, counts), want)
