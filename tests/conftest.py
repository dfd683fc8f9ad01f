import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
# project-local cache for DeepSpeed's JIT ops (compiled once, ~80 s)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The kind of every test file, so each tier runs as one command (tests/README.md):
#   unit         no ranks, no run of the CLI or launchers: the fast loop, `python -m pytest -m unit`
#   distributed  gloo ranks on this machine (dist_utils.run_distributed)
#   system       the product as a user runs it: CLI, launchers, reliability, Slurm, two hosts
TEST_KINDS = {
    "test_bad_configs.py": "unit",
    "test_checkpoint_keys.py": "unit",
    "test_cli.py": "system",
    "test_cli_help_json.py": "system",
    "test_cli_startup.py": "system",
    "test_client_calls.py": "unit",
    "test_client_engine.py": "distributed",
    "test_collapse.py": "unit",
    "test_compile.py": "unit",
    "test_config_errors.py": "unit",
    "test_cuda.py": "unit",
    "test_data.py": "unit",
    "test_deepspeed_checkpoint.py": "distributed",
    "test_deepspeed_engine.py": "distributed",
    "test_deepspeed_expert_seeding.py": "distributed",
    "test_deepspeed_launchers.py": "system",
    "test_deepspeed_layer.py": "unit",
    "test_deepspeed_version_guard.py": "distributed",
    "test_dispatcher.py": "unit",
    "test_docs.py": "unit",
    "test_examples.py": "system",
    "test_expert_construction.py": "unit",
    "test_expert_parallel.py": "distributed",
    "test_gate_knob.py": "unit",
    "test_gpu_check.py": "system",
    "test_gpu_configs.py": "unit",
    "test_import_rule.py": "unit",
    "test_interfaces.py": "unit",
    "test_infonce.py": "unit",
    "test_late_sigterm.py": "unit",
    "test_launch_checks.py": "system",
    "test_layer_api.py": "unit",
    "test_layer_flops.py": "unit",
    "test_layer_grads.py": "unit",
    "test_layer_reference.py": "unit",
    "test_lint.py": "unit",
    "test_loop_policy.py": "unit",
    "test_megatron_deepspeed.py": "distributed",
    "test_megatron_deepspeed_plugin.py": "system",
    "test_megatron_integration.py": "distributed",
    "test_model.py": "unit",
    "test_model_tp.py": "distributed",
    "test_noise_and_losses.py": "unit",
    "test_noise_draws.py": "unit",
    "test_op_count.py": "unit",
    "test_parallel_plan.py": "unit",
    "test_parallel_plan_dist.py": "distributed",
    "test_quality_flops.py": "unit",
    "test_quality_report.py": "unit",
    "test_reliability.py": "system",
    "test_reliability_units.py": "unit",
    "test_resume_all_damaged.py": "system",
    "test_router_variants.py": "unit",
    "test_slurm.py": "system",
    "test_sync_census.py": "unit",
    "test_tensor_parallel.py": "distributed",
    "test_tensor_parallel_layout.py": "unit",
    "test_train.py": "system",
    "test_train_compile.py": "system",
    "test_train_config.py": "unit",
    "test_train_text8.py": "system",
    "test_trainer_syncs.py": "system",
    "test_two_hosts.py": "system",
}
# Tests whose kind is not their file's ("file::test function"): a unit file starts no ranks and no CLI.
TEST_KIND_EXCEPTIONS = {
    "test_bad_configs.py::test_real_cli_exits_2_with_one_line": "system",
    "test_collapse.py::test_s2moe_train_logs_the_collapse_tags_at_every_eval": "system",
    "test_deepspeed_layer.py::test_zero3_and_unsplit_param_groups_fail_inside_deepspeed_initialize": "distributed",
    "test_deepspeed_layer.py::test_layer_never_seen_by_an_engine_moves_onto_deepspeed_groups_at_first_forward":
        "distributed",
    "test_reliability_units.py::test_signal_during_all_reduce_unwritable_folder_on_one_rank_and_collective_timeout":
        "distributed",
    "test_router_variants.py::test_router_variants_under_expert_parallelism": "distributed",
    "test_sync_census.py::test_layer_step_syncs_ep2": "distributed",
}
KINDS = ("unit", "distributed", "system")
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def kind_of(file_name, test_name):
    """The kind of test ``test_name`` in ``tests/<file_name>``; None when the file is not listed."""
    return TEST_KIND_EXCEPTIONS.get(f"{file_name}::{test_name}", TEST_KINDS.get(file_name))


# Its own function name, so another pytest_collection_modifyitems here can coexist; first, so -m sees the kinds.
@pytest.hookimpl(tryfirst=True, specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_kinds(config, items):
    seen = set()
    for item in items:
        path = str(item.path)
        if os.path.dirname(path) != TESTS_DIR:
            continue
        name = os.path.basename(path)
        kind = kind_of(name, item.originalname)
        if kind is None:
            raise pytest.UsageError(f"tests/{name} has no test kind: add it to TEST_KINDS in tests/conftest.py "
                                    f"as one of {', '.join(KINDS)}")
        item.add_marker(kind)
        seen.add((name, item.originalname))
    if any("::" in arg for arg in config.args):
        return  # single tests picked by node id: the rest of their files is not collected
    files = {name for name, _ in seen}
    stale = [key for key in TEST_KIND_EXCEPTIONS
             if key.split("::")[0] in files and tuple(key.split("::")) not in seen]
    if stale:
        raise pytest.UsageError("TEST_KIND_EXCEPTIONS in tests/conftest.py names tests that do not exist "
                                f"(renamed? update the entry): {', '.join(stale)}")


def _no_cuda_reason():
    """Why CUDA tests cannot run here, or None when a GPU is visible."""
    import torch
    if torch.cuda.is_available():
        return None
    if not torch.version.cuda:
        return f"needs a CUDA GPU: torch {torch.__version__} is a CPU build"
    return f"needs a CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no device"


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if "cuda" in item.keywords]
    if not marked:
        return
    reason = _no_cuda_reason()
    if reason:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))
