"""`python -m ltm.rescore`: a checkpoint's IW bound at several K from one stream of draws, in bounded
memory, by the metric names of `ltm.names`, with the change between successive K and its interval."""

import pandas as pd
import pytest
import torch

import ltm
import ltm.train
from ltm import rescore
from ltm.config import run_preset
from ltm.evaluate import iw_bounds, sequence_bounds


def test_the_bound_at_k_is_the_first_k_draws_whatever_the_chunk(smoke_model, tokens):
    cfg = ltm.InferenceConfig(steps=2)
    seeds = [4, 5, 6]
    chunked = iw_bounds(smoke_model, tokens, cfg, seeds=seeds, ks=[3, 8], chunk=3)
    one_at_a_time = iw_bounds(smoke_model, tokens, cfg, seeds=seeds, ks=[8], chunk=1)
    torch.testing.assert_close(chunked[8], one_at_a_time[8], rtol=1e-5, atol=1e-4)
    # the validation metric's val/ppl_iw at K = 8 uses the same draws
    logged = sequence_bounds(smoke_model, tokens, cfg, seeds=seeds, iw_samples=8, reuse_score=False).iw
    torch.testing.assert_close(chunked[8], logged.double(), rtol=1e-5, atol=1e-4)
    assert not torch.equal(chunked[3], chunked[8])
    with pytest.raises(ValueError, match="every K >= 1"):
        iw_bounds(smoke_model, tokens, cfg, seeds=seeds, ks=[0, 8])


def test_rescore_prints_and_writes_each_k_by_name(tmp_path, capsys):
    cfg = run_preset("smoke").with_overrides([f"data.cache_dir={tmp_path / 'cache'}", "train.tokens=2048",
                                              "train.eval_every=0", "inference.steps=2"])
    result = ltm.train.run(cfg, runs_dir=tmp_path / "runs", progress=False)
    out = tmp_path / "iw.csv"
    assert rescore.main([str(result.run_dir), "--k", "8,2,4", "--blocks", "4", "--chunk", "3",
                         "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("ELBO bound ") and printed[2].startswith("val/ppl_iw_k2: ")
    assert printed[3].startswith("val/ppl_iw_k4: ") and "; from K=2: " in printed[3]
    row = pd.read_csv(out).iloc[0]
    assert list(row.index) == ["val/bound", "val/ppl_iw_k2", "val/ppl_iw_k4", "val/ppl_iw_k8"]
    assert (row > 1).all()


def test_rescore_refuses_bad_k_and_an_unknown_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        rescore.main(["somewhere", "--k", "8,x"])
    assert exit_.value.code == 2 and "--k takes integers separated by commas" in capsys.readouterr().err
    assert rescore.main(["no-such-run", "--runs-dir", str(tmp_path)]) == 2
    assert "no-such-run" in capsys.readouterr().err
