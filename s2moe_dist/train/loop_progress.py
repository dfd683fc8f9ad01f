"""What rank 0 prints while training: a tqdm bar on a terminal, plain lines at log steps when the
output goes to a file (Slurm logs), and the trainer's messages either way. Other ranks print nothing."""
from __future__ import annotations

import math
import sys
from typing import Dict

PREFIX = "[s2moe-train]"


class Progress:
    def __init__(self, rank: int, enabled: bool):
        self.rank = rank
        self.enabled = enabled  # train.progress
        self.bar = None  # tqdm, between open() and close() on a terminal
        self.lines = False  # plain progress lines instead of a bar

    def open(self, total: int, initial: int) -> None:
        from tqdm import tqdm

        show_bar = self.rank == 0 and self.enabled and sys.stderr.isatty()
        self.lines = self.rank == 0 and self.enabled and not show_bar
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step",
                        desc="s2moe-train") if show_bar else None

    def say(self, msg: str) -> None:
        """A message on rank 0 (above the bar, when there is one)."""
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(f"{PREFIX} {msg}")
        else:
            print(f"{PREFIX} {msg}", flush=True)

    def logged(self, step: int, total: int, values: Dict[str, float]) -> None:
        """The scalars of a log step: on the bar, or as one line."""
        post = {"loss": f"{values['train/loss_total']:.3f}",
                "bpc": f"{values['train/loss_task'] / math.log(2):.3f}",
                "tok/s": f"{values['train/tokens_per_s']:.0f}"}
        if self.bar is not None:
            self.bar.set_postfix(post, refresh=False)
        elif self.lines:
            self.say(f"step {step}/{total} " + " ".join(f"{k} {v}" for k, v in post.items()))

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
