"""Old import path, kept for users: a thin re-export of the resharder, which lives in
``s2moe_dist.checkpoint`` (``live``: ``load_checkpoint`` into an engine of another EP or
data-parallel size; ``convert``: offline ``reshard_checkpoint``; ``reshard_cli``: ``main``;
``optim_formats`` / ``canonical`` / ``optim_state``: the optimizer formats, canonical names and
typed state). ``python -m s2moe_dist.integrations.reshard SRC DST --ep-size N`` still works.
"""
from ..checkpoint.canonical import canonical_expert_names
from ..checkpoint.convert import reshard_checkpoint
from ..checkpoint.io import resolve_tag
from ..checkpoint.keys import DS_EXPERTS
from ..checkpoint.live import apply_full_optimizer_state, install_ep_aware_checkpoint_loading, load_checkpoint
from ..checkpoint.optim_formats import MODEL_FILE, full_optimizer_state, saved_layout
from ..checkpoint.optim_state import PORTABLE_FILE, PORTABLE_FORMAT, CanonicalState
from ..checkpoint.reshard_cli import main

__all__ = ["DS_EXPERTS", "MODEL_FILE", "PORTABLE_FILE", "PORTABLE_FORMAT", "CanonicalState",
           "apply_full_optimizer_state", "canonical_expert_names", "full_optimizer_state",
           "install_ep_aware_checkpoint_loading", "load_checkpoint", "main", "reshard_checkpoint", "resolve_tag",
           "saved_layout"]

if __name__ == "__main__":
    raise SystemExit(main())
