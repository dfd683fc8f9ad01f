"""The engine-side DeepSpeed fixes follow 0.19.8's internals: on anything else they must say so,
not silently train with DeepSpeed's wrong MoE gradient norm."""
import types
import warnings

import pytest
import torch

from deepspeed_tiny_train import TinyMoEModel, batch, ds_config
from dist_utils import run_distributed


CASES = [  # (fake DeepSpeed version, hide the engine from the stack, expected warning parts, fix installed)
    (None, False, [], True),  # the tested version: no warning, the fix installed
    ("0.20.1", False, ["DeepSpeed 0.20.1", "replace internals of another DeepSpeed version"], True),
    (None, True, ["no DeepSpeedEngine was found", "were NOT installed"], False),
]


def _initialize_and_collect_warnings(rank, world):
    import deepspeed
    import s2moe_dist.integrations.deepspeed as integ
    from s2moe_dist import S2MoE
    real_version, real_calling_engine = deepspeed.__version__, integ._calling_engine
    out = []
    for fake_version, hide_engine, _, _ in CASES:
        deepspeed.__version__ = fake_version or real_version
        if hide_engine:  # what a DeepSpeed that calls set_deepspeed_parallelism from elsewhere looks like
            integ._calling_engine = lambda *a, **k: None
        try:
            model = TinyMoEModel(S2MoE, ep_size=world)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config(0),
                                                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
            loss = engine(*batch(rank))  # still trains
            engine.backward(loss)
            engine.step()
        finally:
            deepspeed.__version__, integ._calling_engine = real_version, real_calling_engine
        out.append({"warnings": [str(w.message) for w in caught if "s2moe_dist" in str(w.message)],
                    "fixed_clipping": "clip_fp32_gradients" in engine.__dict__})
    return out


def test_untested_deepspeed_or_missing_engine_warns():
    per_rank = run_distributed(_initialize_and_collect_warnings, 2, use_deepspeed=True)
    for res in per_rank:
        for (version, hide, expect, fixed), r in zip(CASES, res):
            case = f"version={version} hide_engine={hide}"
            assert r["fixed_clipping"] is fixed, case
            if not expect:
                assert r["warnings"] == [], (case, r["warnings"])
            else:
                assert len(r["warnings"]) == 1, (case, r["warnings"])
                assert all(part in r["warnings"][0] for part in expect + ["0.19.8"]), (case, r["warnings"])


def test_renamed_engine_internals_warn_instead_of_patching_nothing():
    from s2moe_dist.integrations.deepspeed import (install_moe_grad_clipping,
                                                   install_moe_grad_norm_for_unfused_optimizer)
    engine = types.SimpleNamespace()  # an engine without 0.19.8's method names
    with pytest.warns(RuntimeWarning, match="clip_fp32_gradients not found"):
        install_moe_grad_clipping(engine)
    with pytest.warns(RuntimeWarning, match="_configure_fp16_optimizer not found"):
        install_moe_grad_norm_for_unfused_optimizer(engine)
    assert vars(engine) == {}
