"""300 steps of the tiny model on the first 12.5M characters of text8, 2 ranks: validation BPC
must drop below 3.0 (text8's unigram entropy is ~4.1 bits, a bigram model ~3.3)."""
import json
import os
import time

import pytest

from train_ranks import ROOT, Ranks

TEXT8 = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "text8-head-12.5M.gz"))
ZERO1 = os.path.join(ROOT, "configs", "deepspeed", "zero1_fp32.json")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(TEXT8), reason=f"{TEXT8} is not there (the shared data folder "
                                                      "../shared/data next to the repo); nothing to train on")
def test_tiny_model_reaches_bpc_below_3_on_text8_in_300_steps(tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    ranks = Ranks(out, base=["--config", os.path.join(ROOT, "configs", "model", "tiny.yaml"), "--deepspeed", ZERO1,
                             "--data", TEXT8, "--set", "train.steps=300", "train.log_every=50",
                             "train.eval_every=0", "train.eval_windows=512", "train.ckpt_every=0",
                             "train.progress=false"], name="text8")
    codes = ranks.wait(timeout=600)
    assert codes == [0, 0], ranks.output()
    final = json.load(open(os.path.join(str(out), "final_eval.json")))
    print(f"text8, 300 steps, 2 ranks: {time.monotonic() - start:.0f} s, validation BPC {final['bpc_valid']}")
    assert final["step"] == 300
    assert final["bpc_valid"]["1"] < 3.0 and final["bpc_valid"]["2"] < 3.0, final
