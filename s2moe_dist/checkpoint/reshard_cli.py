"""``s2moe-ckpt reshard SRC DST --ep-size N [--tag T]`` (``convert.reshard_checkpoint``)."""
from __future__ import annotations

import argparse
import os

from .convert import reshard_checkpoint


def main(argv=None) -> int:
    """``s2moe-ckpt reshard SRC DST --ep-size N [--tag T]``."""
    p = argparse.ArgumentParser(prog="s2moe-ckpt reshard",
                                description="Convert a DeepSpeed checkpoint of an S2MoE model to another "
                                            "expert-parallel size.")
    p.add_argument("src", help="checkpoint directory (the one holding 'latest')")
    p.add_argument("dst", help="output directory")
    p.add_argument("--ep-size", type=int, required=True, help="new expert-parallel size")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    args = p.parse_args(argv)
    tag = reshard_checkpoint(args.src, args.dst, args.ep_size, tag=args.tag)
    print(f"wrote {os.path.join(args.dst, tag)} for ep_size={args.ep_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
