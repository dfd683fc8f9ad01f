"""``train.compile``: torch.compile the model in place before training.

``nn.Module.compile`` compiles the module's call without wrapping it, so DeepSpeed's engine,
parameter names, checkpoints and ``s2moe-eval`` see the same model as without compiling. The MoE
layers compile without graph breaks at expert-parallel size 1 (dropless); under expert
parallelism the all-to-all's split sizes are read on the host once per layer, where the graph
breaks by design.
"""
from __future__ import annotations

from ..config import config_error


def check_backend(owner: str, backend: str) -> None:
    """Refuse an unknown backend at config time, before any process group starts."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise config_error(owner, "compile_backend", backend, f"must be a torch.compile backend: {', '.join(known)}")


def compile_model(model, backend: str) -> None:
    """Compile ``model``'s forward in place (one graph for the whole model where it allows)."""
    model.compile(backend=backend)
