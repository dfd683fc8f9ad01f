import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
# project-local cache for DeepSpeed's JIT ops (compiled once, ~80 s)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
        import pytest
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))
