"""Expert-collapse diagnostics of a finished checkpoint, the same numbers ``s2moe-train`` logs
at every eval (``moe/layer{i}/expert_cosine``, ``moe/layer{i}/expert_effective_rank``):

    python -m s2moe_dist.train.collapse_eval RUN_OR_CHECKPOINT --data TEXT8 [--sequences 4]

prints one JSON line ``{"step": N, "layers": {"0": {"expert_cosine": ..., ...}, ...}}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict

from ..moe.collapse import collapse_stats, probe_batch


def checkpoint_collapse(path: str, data: str, sequences: int = 4) -> Dict[str, Any]:
    from ..data import load_corpus
    from .load import load_model

    model, run, state = load_model(path)
    d = run.data
    corpus = load_corpus(data, kind=d.kind, split=tuple(d.split), cache_dir=d.cache_dir)
    probe = probe_batch(corpus.valid, run.model.seq_len, "cpu", sequences)
    stats = collapse_stats(model, model.moe_layers(), probe)
    return {"step": int(state["step"]), "layers": {str(i): st for i, st in stats.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="an s2moe-train --output folder, its checkpoints/ or a global_stepN folder")
    p.add_argument("--data", required=True, help="the run's data file (the probe is the validation split's start)")
    p.add_argument("--sequences", type=int, default=4, help="probe windows (default 4, as s2moe-train)")
    args = p.parse_args(argv)
    print(json.dumps(checkpoint_collapse(args.checkpoint, args.data, args.sequences)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
