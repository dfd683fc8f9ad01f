"""Console scripts: ``s2moe-train``, ``s2moe-eval``, ``s2moe-ckpt``.

    s2moe-train --config configs/model/tiny.yaml --deepspeed configs/deepspeed/zero1_fp32.json \\
                [--data text8.gz] [--set train.steps=100 model.moe.moe_type=smoe] [--resume auto] [--output DIR]
    s2moe-eval  --checkpoint DIR [--data FILE] [--eval-k 1 2] [--split test] [--json]
    s2moe-ckpt  reshard SRC DST --ep-size N   (s2moe_dist.checkpoint.reshard_cli)

Bad arguments and configs exit with status 2 and one line naming the field and the fix.
s2moe-train: 3 when NaN/Inf steps stopped the run, 4 when a checkpoint could not be written
(docs/operations.md#exit-codes); SIGTERM (from CLI entry on, start-up included) checkpoints and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import List, Optional


def _fail(prog: str, err: Exception) -> int:
    print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
    return 2


# what torch's collectives and rendezvous raise when a peer is gone, hung or unreachable
COLLECTIVE_FAILURE_WORDS = ("gloo", "nccl", "timed out", "connection reset", "connection closed",
                            "connection refused", "broken pipe")


def collective_failed(err: BaseException) -> bool:
    """A failed collective / rendezvous (DistNetworkError, DistStoreError, gloo or NCCL errors)."""
    if type(err).__name__ in ("DistNetworkError", "DistStoreError", "DistBackendError"):
        return True
    text = str(err).lower()
    return any(w in text for w in COLLECTIVE_FAILURE_WORDS)


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default (or that it is required), unless its help says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required:
            return text + " (required)"
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


@contextlib.contextmanager
def stdout_to_stderr():
    """Everything written to stdout inside (Python prints and the file descriptor, e.g. DeepSpeed's
    "op built successfully" lines and compiler output) goes to stderr, so a console script's
    result is the only thing on stdout."""
    sys.stdout.flush()
    saved_fd = os.dup(1)
    saved = sys.stdout
    try:
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = saved
        os.dup2(saved_fd, 1)
        os.close(saved_fd)


def library_logs_to_stderr() -> None:
    """Send DeepSpeed's log lines to stderr, so stdout holds only what the console script prints
    (``s2moe-eval --json | jq``). DeepSpeed's logger binds its handler to ``sys.stdout`` when it is
    first imported and logs at import (the accelerator line), so it is imported here with stdout
    pointing at stderr; an already-bound handler is moved too."""
    import logging

    saved = sys.stdout
    sys.stdout = sys.stderr
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return
    finally:
        sys.stdout = saved
    for handler in logging.getLogger("DeepSpeed").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s2moe-train", description="Pre-train the S2MoE character LM on DeepSpeed.",
                                formatter_class=_HelpWithDefaults)
    p.add_argument("--config", required=True, help="run YAML (model/train/data), e.g. configs/model/tiny.yaml")
    p.add_argument("--deepspeed", default=None,
                   help="DeepSpeed JSON (ZeRO stage, bf16, offload), e.g. configs/deepspeed/zero1_fp32.json; "
                        "default: ZeRO-0 fp32")
    p.add_argument("--data", default=None, help="text8 / enwik8 file (plain, .gz, .zip); default: built-in corpus")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. train.steps=100 model.moe.num_experts=16")
    p.add_argument("--resume", default=None,
                   help="'auto': continue from this run's last complete checkpoint (fresh start if none); "
                        "or a checkpoints/global_stepN folder; default: a fresh run (an --output holding "
                        "checkpoints is refused)")
    p.add_argument("--output", default=None, help="run folder (TensorBoard, checkpoints, metrics); "
                                                  "default runs/<config name>")
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


EXIT_NONFINITE = 3
EXIT_CHECKPOINT = 4


def train_main(argv: Optional[List[str]] = None) -> int:
    # SIGTERM / SIGUSR1 handlers first: the imports and start-up below take 10-20 s, and a
    # preemption signal then must not kill the rank (it exits 0 once all ranks agree)
    from .train.signals import SignalFlags
    flags = SignalFlags().install()
    try:
        args = train_parser().parse_args(argv)
        library_logs_to_stderr()
        from .train.checkpoint import CheckpointError
        from .train.nonfinite import NonFiniteError
        from .train.trainer import TrainArgs, train
        targs = TrainArgs(config=args.config, deepspeed=args.deepspeed, data=args.data, overrides=args.overrides,
                          resume=args.resume, output=args.output)
        try:
            return train(targs, flags)
        except ValueError as e:
            return _fail("s2moe-train", e)
        except NonFiniteError as e:
            _fail("s2moe-train", e)
            return EXIT_NONFINITE
        except CheckpointError as e:
            _fail("s2moe-train", e)
            return EXIT_CHECKPOINT
        except RuntimeError as e:  # a collective failed: say what it means, keep the traceback
            if collective_failed(e):
                print("s2moe-train: error: a collective failed: another rank died or hung (collective timeout: "
                      "train.collective_timeout_s), or the rendezvous at MASTER_ADDR:MASTER_PORT="
                      f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} is unreachable; the job "
                      "stops here, --resume auto continues from the last complete checkpoint",
                      file=sys.stderr, flush=True)
            raise
    finally:
        flags.uninstall()


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s2moe-eval", description="Bits per character of an s2moe-train checkpoint.",
                                formatter_class=_HelpWithDefaults)
    p.add_argument("--checkpoint", required=True,
                   help="a run's --output folder, its checkpoints/ folder or a checkpoints/global_stepN folder")
    p.add_argument("--data", default=None, help="text8 / enwik8 file; default: the file the run trained on")
    p.add_argument("--eval-k", type=int, nargs="+", default=None,
                   help="experts per token at inference (default: the run's train.eval_k)")
    p.add_argument("--split", choices=("test", "valid", "train"), default="test", help="split of the file")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (default all)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="parameter dtype to evaluate in (default auto: the dtype the run trained in, "
                        "bf16 for a DeepSpeed bf16 run)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of text (nothing else goes to stdout)")
    return p


def evaluate_checkpoint(checkpoint: str, data: Optional[str] = None, eval_k: Optional[List[int]] = None,
                        split: str = "test", max_windows: Optional[int] = None, batch_size: int = 16,
                        dtype: str = "auto") -> dict:
    import torch

    from .data import EvalBatches, load_corpus
    from .train.evaluate import bpc
    from .train.load import load_model
    from .train.precision import training_dtype

    if batch_size < 1:
        raise ValueError(f"--batch-size={batch_size} is invalid: must be >= 1")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"--max-windows={max_windows} is invalid: must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    want = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model, run, state = load_model(checkpoint, device=device, dtype=want)
    path = data if data is not None else run.data.path
    if path is not None and not os.path.isfile(path):
        raise ValueError(f"--data {path!r}: no such file" + ("" if data else " (the file the run trained on); "
                                                               "pass --data"))
    corpus = load_corpus(path, kind=run.data.kind, split=tuple(run.data.split), cache_dir=run.data.cache_dir)
    if corpus.vocab_size > run.model.vocab_size:
        raise ValueError(f"--data {path!r}: {corpus.kind} has {corpus.vocab_size} symbols, the model was trained "
                         f"with vocab_size={run.model.vocab_size}")
    ks = eval_k or list(run.train.eval_k)
    n_exp = run.model.moe.num_experts
    bad = [k for k in ks if not 1 <= k <= n_exp]
    if bad:
        raise ValueError(f"--eval-k {bad} is invalid: each value must be in [1, num_experts={n_exp}]")
    tokens = corpus.get_split(split)
    bs = min(batch_size, max_windows) if max_windows else batch_size
    batches = EvalBatches(tokens, run.model.seq_len, bs, 0, 1,
                          max_batches=-(-max_windows // bs) if max_windows else None)
    result = bpc(model, batches, ks, device)
    return {"checkpoint": state["checkpoint"], "step": state["step"], "data": path or "builtin",
            "split": split, "characters_scored": batches.num_targets,
            "dtype": str(want or training_dtype(state["param_dtypes"])).replace("torch.", ""),
            "bpc": {str(k): v for k, v in result.items()}}


def eval_main(argv: Optional[List[str]] = None) -> int:
    args = eval_parser().parse_args(argv)
    library_logs_to_stderr()
    try:
        with stdout_to_stderr():  # only the result goes to stdout (--json | jq)
            out = evaluate_checkpoint(args.checkpoint, args.data, args.eval_k, args.split, args.max_windows,
                                      args.batch_size, args.dtype)
    except ValueError as e:
        return _fail("s2moe-eval", e)
    finally:
        from .train.distributed import destroy_process_group
        destroy_process_group()
    if args.json:
        print(json.dumps(out))
    else:
        print(f"checkpoint {out['checkpoint']} (step {out['step']}), {out['data']} {out['split']} split, "
              f"{out['characters_scored']} characters, {out['dtype']}")
        for k, v in out["bpc"].items():
            print(f"BPC k={k}: {v:.4f}")
    return 0


CKPT_USAGE = "usage: s2moe-ckpt reshard SRC DST --ep-size N [--tag T]   (change a checkpoint's expert-parallel size)"


def ckpt_main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(CKPT_USAGE)
        return 0 if argv else 2
    if argv[0] != "reshard":
        print(f"s2moe-ckpt: unknown command {argv[0]!r}\n{CKPT_USAGE}", file=sys.stderr)
        return 2
    library_logs_to_stderr()
    from .checkpoint.reshard_cli import main
    try:
        return main(argv[1:])
    except ValueError as e:
        return _fail("s2moe-ckpt reshard", e)


if __name__ == "__main__":  # python -m s2moe_dist.cli {train,eval,ckpt} ...
    commands = {"train": train_main, "eval": eval_main, "ckpt": ckpt_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f"usage: python -m s2moe_dist.cli {{{','.join(commands)}}} ...", file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))
