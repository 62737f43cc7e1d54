"""One training run end to end: tracking, resume, interruption, failure, bad input, several processes."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import ltm
import ltm.checkpoint as checkpoint
import ltm.train as train
from ltm import objective
from ltm.config import ConfigError, run_preset
from ltm.names import EVAL_SECONDS, NOTE_TAG, RUN_KEY_TAG, Exit
from ltm.processes import resolve_device
from ltm.tracking import TrackingError, default_tracking_uri

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_METRICS = {"train/loss", "train/bound", "train/ppl_bound", "val/bound", "val/nll", "val/kl", "val/ppl_bound",
                    "val/ppl_iw", "val/ppl_reuse", "tokens", "flops", "flops_paper", "tokens_per_s", "n_params",
                    "n_params_nonembedding", "flops_per_token"}
LATENT_METRICS = {"val/kl_floor", "val/kl_above_floor", "val/nll_other_z", "val/z_info_lb", "val/z_info_lb_ci",
                  "val/z_info_cap", "val/nll_prior"}
"""What an LTM evaluation adds to decompose its bound; an AR run logs none of them."""


def smoke(tmp_path, *overrides):
    cfg = run_preset("smoke").with_overrides([f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    return cfg


def cli(tmp_path, *args, runs="runs"):
    return [sys.executable, "-m", "ltm.train", "--preset", "smoke", "--runs-dir", str(tmp_path / runs),
            "--no-progress", "--set", f"data.cache_dir={tmp_path / 'cache'}", *args]


def history(uri, run_id, key):
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_lr_warms_up_then_decays_to_its_minimum():
    tc = run_preset("smoke").train
    assert objective.lr_at(0, 100, tc) == pytest.approx(tc.lr / tc.warmup_steps)
    assert objective.lr_at(tc.warmup_steps - 1, 100, tc) == pytest.approx(tc.lr)
    assert objective.lr_at(100, 100, tc) == pytest.approx(tc.min_lr)


def test_smoke_run_logs_everything_and_a_second_call_skips_it(tmp_path):
    cfg = smoke(tmp_path)
    result = train.run(cfg, runs_dir=tmp_path / "runs", experiment="t", progress=False)
    assert result.status == "FINISHED"
    client = MlflowClient(default_tracking_uri(tmp_path / "runs"))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert EXPECTED_METRICS | LATENT_METRICS <= set(run.data.metrics)
    for step, _ in history(client.tracking_uri, result.run_id, "val/kl"):  # at every evaluation, beside val/kl
        assert {k: [s for s, _ in history(client.tracking_uri, result.run_id, k)].count(step)
                for k in LATENT_METRICS} == dict.fromkeys(LATENT_METRICS, 1)
    assert 0 < result.metrics["val/kl_floor"] <= result.metrics["val/kl"]
    assert run.data.params["inference.steps"] == "4" and run.data.params["model.kind"] == "ltm"
    (data,) = run.inputs.dataset_inputs  # lineage: the UI's Dataset column
    assert (data.dataset.name, data.dataset.source_type) == ("synthetic", "synthetic")
    other = train.run(cfg.with_overrides(["data.synthetic_tokens=150000"]), runs_dir=tmp_path / "runs", experiment="o",
                      progress=False)  # other data: another digest
    assert client.get_run(other.run_id).inputs.dataset_inputs[0].dataset.digest != data.dataset.digest
    assert int(run.data.params["n_params"]) > int(run.data.params["n_params_nonembedding"])
    # its size as metrics too (columns of the UI's runs table), and the bound in nats/token read from its parts
    assert run.data.metrics["n_params"] == int(run.data.params["n_params"])
    assert run.data.metrics["flops_per_token"] == pytest.approx(result.metrics["flops"] / cfg.train.tokens)
    m = run.data.metrics
    assert m["val/bound"] == pytest.approx(m["val/nll"] + m["val/kl"]) == pytest.approx(math.log(m["val/ppl_bound"]))
    assert m["val/kl_above_floor"] == pytest.approx(m["val/kl"] - m["val/kl_floor"])
    assert run.data.tags[NOTE_TAG] == "LTM smoke L2 d32 window 16 T=4 N_z=4 logvar=-5 start, 16.4k tokens"
    assert run.data.tags[RUN_KEY_TAG] == cfg.run_key()
    assert {"git_commit", "torch_version", "device"} <= set(run.data.tags)
    assert "config.json" in [a.path for a in client.list_artifacts(result.run_id)]
    # metric steps are tokens seen
    assert history(client.tracking_uri, result.run_id, "tokens")[-1] == (cfg.train.tokens, cfg.train.tokens)
    assert math.isfinite(result.metrics["val/ppl_bound"])

    again = train.run(cfg, runs_dir=tmp_path / "runs", experiment="t", progress=False)
    assert again.status == "SKIPPED" and again.run_id == result.run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1

    forced = train.run(cfg, runs_dir=tmp_path / "runs", experiment="t", progress=False, force=True)
    assert forced.status == "FINISHED" and forced.run_id != result.run_id
    assert forced.metrics["val/ppl_bound"] == pytest.approx(result.metrics["val/ppl_bound"], rel=1e-5)  # seeded


def test_each_evaluation_logs_what_it_cost_in_seconds(tmp_path):
    result = train.run(smoke(tmp_path), runs_dir=tmp_path / "runs", experiment="t", progress=False)
    uri = default_tracking_uri(tmp_path / "runs")
    evaluations = sorted(step for step, _ in history(uri, result.run_id, "val/kl"))
    seconds = sorted(history(uri, result.run_id, EVAL_SECONDS))
    assert len(evaluations) >= 2 and [step for step, _ in seconds] == evaluations  # step = tokens seen
    assert all(value > 0 for _, value in seconds)


def test_ar_run_trains_and_scores_exactly(tmp_path):
    result = train.run(smoke(tmp_path, "model.kind=ar"), runs_dir=tmp_path / "runs", progress=False)
    assert result.status == "FINISHED"
    assert result.metrics["val/kl"] == 0
    assert result.metrics["val/ppl_iw"] == pytest.approx(result.metrics["val/ppl_bound"])
    assert not LATENT_METRICS & set(result.metrics)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    a = train.run(smoke(tmp_path, "train.tokens=4096"), runs_dir=tmp_path / "a", progress=False)
    b = train.run(smoke(tmp_path, "train.tokens=4096", "train.micro_batch_size=2"), runs_dir=tmp_path / "b",
                  progress=False)
    assert b.metrics["val/ppl_bound"] == pytest.approx(a.metrics["val/ppl_bound"], rel=1e-4)


def wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    args = ["--set", "train.tokens=32768", "--set", "train.checkpoint_every=2048", "--experiment", "r"]
    straight = subprocess.run(cli(tmp_path, *args, runs="straight"), capture_output=True, text=True, cwd=ROOT)
    assert straight.returncode == 0, straight.stderr

    proc = subprocess.Popen(cli(tmp_path, *args, runs="killed"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    target = 2 + int.from_bytes(os.urandom(1), "little") % 5  # a random point in the run
    assert wait_for(lambda: len(list(ckpts.glob("*/ckpt-*.sha256"))) >= 1 and
                    max(int(p.stem.split("-")[1]) for p in ckpts.glob("*/ckpt-*.pt")) >= target * 2048)
    proc.kill()
    proc.wait()
    resumed = subprocess.run(cli(tmp_path, *args, runs="killed"), capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run" in resumed.stderr  # a message while it works: on stderr

    def only_run(runs):
        uri = default_tracking_uri(tmp_path / runs)
        client = MlflowClient(uri)
        runs_ = client.search_runs([client.get_experiment_by_name("r").experiment_id])
        assert len(runs_) == 1
        return uri, runs_[0]

    (uri_a, a), (uri_b, b) = only_run("straight"), only_run("killed")
    assert b.info.status == "FINISHED"
    for key in ("tokens", "train/loss", "val/ppl_bound"):
        steps_a = [s for s, _ in history(uri_a, a.info.run_id, key)]
        steps_b = [s for s, _ in history(uri_b, b.info.run_id, key)]
        assert sorted(steps_b) == sorted(set(steps_b)) == sorted(steps_a), key  # none duplicated, none missing
    for key in ("val/ppl_bound", "val/ppl_iw", "train/loss"):
        assert b.data.metrics[key] == pytest.approx(a.data.metrics[key], rel=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_checkpoints_and_leaves_the_run_resumable(tmp_path, sig):
    args = ["--set", "train.tokens=65536", "--set", "train.checkpoint_every=2048", "--experiment", "s"]
    proc = subprocess.Popen(cli(tmp_path, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    uri = default_tracking_uri(tmp_path / "runs")
    # Poll the file system, not the database, so the test does not contend for the SQLite lock.
    started = wait_for(lambda: bool(list((tmp_path / "runs" / "checkpoints").glob("*/ckpt-*.sha256"))) or
                       proc.poll() is not None)
    assert started and proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == Exit.INTERRUPTED, err
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("s").experiment_id])[0]
    assert run.info.status == "KILLED" and sig.name in run.data.tags["ltm.status_reason"]
    assert list((tmp_path / "runs" / "checkpoints").glob("*/ckpt-*.pt"))
    again = subprocess.run(cli(tmp_path, *args), capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and "resuming run" in again.stderr
    resumed = client.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED"
    straight = train.run(smoke(tmp_path, "train.tokens=65536", "train.checkpoint_every=2048"),
                         runs_dir=tmp_path / "straight", experiment="s", progress=False)
    for key in ("val/ppl_bound", "val/ppl_iw", "train/loss"):  # the same numbers as without the signal
        assert resumed.data.metrics[key] == pytest.approx(straight.metrics[key], rel=1e-4), key


def test_a_failure_after_the_run_is_created_marks_it_failed(tmp_path):
    def broken(metrics):  # the caller's progress report fails at the first logged step
        raise RuntimeError("no memory for the report")

    with pytest.raises(RuntimeError, match="no memory"):
        train.run(smoke(tmp_path), runs_dir=tmp_path / "runs", experiment="f", progress=False, on_log=broken)
    client = MlflowClient(default_tracking_uri(tmp_path / "runs"))
    (run,) = client.search_runs([client.get_experiment_by_name("f").experiment_id])
    assert run.info.status == "FAILED" and "no memory for the report" in run.data.tags["ltm.status_reason"]


def test_a_bare_cuda_device_means_this_processs_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # sees its node's GPUs (tests/test_processes.py)
    assert resolve_device("cuda", 3, cuda_available=True) == torch.device("cuda", 3)
    assert resolve_device("cuda:1", 3, cuda_available=True) == torch.device("cuda", 1)
    assert resolve_device(None, 2, cuda_available=True) == torch.device("cuda", 2)
    assert resolve_device(None, 2, cuda_available=False) == torch.device("cpu")
    assert resolve_device("cpu", 2, cuda_available=True) == torch.device("cpu")


class _Payload:
    """Unpickling this object would run a shell command: what a hostile checkpoint file carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "ckpt-000000000000001.pt"
    torch.save({"config": {}, "model": _Payload(marker)}, hostile)
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoint.load_model(hostile)
    assert not marker.exists()
    # in a run's folder it is skipped as unreadable, with a warning, and nothing runs either
    (tmp_path / "ckpt-000000000000001.sha256").write_text(checkpoint._sha256(hostile))
    with pytest.warns(UserWarning, match="corrupt"):
        assert checkpoint.load_latest_checkpoint(tmp_path) is None
    assert not marker.exists()


def test_checkpoints_hold_only_plain_values_and_resume_the_rng(tmp_path):
    cfg = smoke(tmp_path, "train.tokens=2048")
    result = train.run(cfg, runs_dir=tmp_path / "runs", progress=False)
    state = checkpoint.load_latest_checkpoint(result.run_dir)  # weights_only=True: would raise otherwise
    assert isinstance(state.rng["numpy"][1], list) and len(state.rng["numpy"][1]) == 624
    before = checkpoint.rng_state()
    checkpoint.restore_rng(state.rng)
    restored = checkpoint.rng_state()
    checkpoint.restore_rng(before)
    assert restored["numpy"] == tuple(state.rng["numpy"]) and restored["python"] == state.rng["python"]
    assert torch.equal(restored["torch"], state.rng["torch"])


def _on_disk(cfg, tokens: int) -> dict:
    """A checkpoint file's content in the layout ltm.loop.save has written since eval_pending,
    unsent_metrics and start_tokens were added (a dict of tensors and plain values), spelled out key by key."""
    model = ltm.build_model(cfg.model)
    optimizer = objective.make_optimizer(model, cfg.train)
    model(torch.randint(0, 64, (2, 8)), torch.zeros(2, 4, 32)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 3, "samples": 12,
            "tokens": tokens, "run_id": "r", "run_key": cfg.run_key(), "config": cfg.to_dict(),
            "model_overrides": {"vocab_size": cfg.model.vocab_size}, "eval_pending": True,
            "rng": checkpoint.rng_state(), "unsent_metrics": [["r", "train/loss", 1.5, 1700000000000, tokens]],
            "start_tokens": 64}


def _write_by_hand(run_dir: Path, state: dict) -> Path:
    """A checkpoint file written as save_checkpoint writes it, without it: torch.save of a dict, sha256 beside."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"ckpt-{state['tokens']:015d}.pt"
    torch.save(state, path)
    path.with_suffix(".sha256").write_text(checkpoint._sha256(path))
    return path


def test_checkpoint_files_of_todays_layout_and_older_ones_load_as_a_checkpoint(tmp_path):
    cfg = run_preset("smoke")
    today = _on_disk(cfg, 200)
    _write_by_hand(tmp_path / "today", today)
    state = checkpoint.load_latest_checkpoint(tmp_path / "today")
    assert isinstance(state, checkpoint.Checkpoint) and state.to_dict().keys() == today.keys()
    assert (state.step, state.samples, state.tokens, state.run_id, state.run_key, state.eval_pending,
            state.start_tokens) == (3, 12, 200, "r", cfg.run_key(), True, 64)
    assert state.config == cfg.to_dict() and state.unsent_metrics == today["unsent_metrics"]
    assert all(torch.equal(state.model[k], v) for k, v in today["model"].items())
    model, loaded = checkpoint.load_model(tmp_path / "today")
    assert loaded == cfg and all(torch.equal(model.state_dict()[k], v) for k, v in today["model"].items())
    # written again, the file holds the same keys and values: the layout is unchanged
    again = torch.load(checkpoint.save_checkpoint(tmp_path / "again", state), weights_only=True)
    assert again.keys() == today.keys() and again["rng"]["python"] == today["rng"]["python"]
    assert {k: again[k] for k in today if k not in ("model", "optimizer", "rng")} == {
        k: today[k] for k in today if k not in ("model", "optimizer", "rng")}
    # older files lack the keys added later: they take their defaults
    older = {k: v for k, v in _on_disk(cfg, 100).items()
             if k not in ("eval_pending", "unsent_metrics", "run_key", "start_tokens")}
    _write_by_hand(tmp_path / "older", older)
    state = checkpoint.load_latest_checkpoint(tmp_path / "older")
    assert (state.tokens, state.eval_pending, state.unsent_metrics, state.run_key, state.start_tokens) == (
        100, False, [], None, 0)
    assert checkpoint.load_model(tmp_path / "older")[1] == cfg


def test_a_file_without_what_every_checkpoint_holds_is_skipped_as_corrupt(tmp_path, stub_checkpoint):
    checkpoint.save_checkpoint(tmp_path, stub_checkpoint(100))
    _write_by_hand(tmp_path, {"tokens": 200, "run_id": "r"})
    with pytest.warns(UserWarning, match="not a checkpoint of this suite: it has no model, optimizer"):
        assert checkpoint.load_latest_checkpoint(tmp_path).tokens == 100


def test_non_finite_loss_marks_the_run_failed_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = objective.decoder_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, kl = real(*args, **kwargs)
        return (loss * float("nan"), kl) if calls["n"] > 20 else (loss, kl)

    monkeypatch.setattr(objective, "decoder_loss", poisoned)  # what every update computes
    cfg = smoke(tmp_path, "train.checkpoint_every=2048")
    result = train.run(cfg, runs_dir=tmp_path / "runs", progress=False)
    assert result.status == "FAILED" and "non-finite training loss" in result.reason
    run = MlflowClient(default_tracking_uri(tmp_path / "runs")).get_run(result.run_id)
    assert run.info.status == "FAILED" and "non-finite" in run.data.tags["ltm.status_reason"]
    state = checkpoint.load_latest_checkpoint(result.run_dir)
    assert state.step == 16  # the last good checkpoint (2048 tokens per 8 updates), not the poisoned state
    assert all(torch.isfinite(v).all() for v in state.model.values())


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, stub_checkpoint):
    for tokens in (100, 200):
        checkpoint.save_checkpoint(tmp_path, stub_checkpoint(tokens, step=tokens))
    latest = checkpoint.checkpoints(tmp_path)[-1]
    latest.write_bytes(latest.read_bytes()[:-10] + b"corrupted!")
    with pytest.warns(UserWarning, match="corrupt"):
        state = checkpoint.load_latest_checkpoint(tmp_path)
    assert state.tokens == 100


def test_planning_an_evaluation_names_the_checkpoint_that_loads_when_the_newest_is_corrupt(tmp_path, stub_checkpoint):
    cfg = run_preset("smoke")
    checkpoint.write_run_config(tmp_path, cfg, cfg.model, "r")
    for tokens in (100, 200):
        checkpoint.save_checkpoint(tmp_path, stub_checkpoint(tokens, config=cfg.to_dict()))
    previous, newest = checkpoint.checkpoints(tmp_path)
    newest.write_bytes(newest.read_bytes()[:-10] + b"corrupted!")
    uri = default_tracking_uri(tmp_path / "runs")
    with pytest.warns(UserWarning, match="corrupt"):
        resolved = checkpoint.resolve(str(tmp_path), uri, tmp_path / "runs")
    with pytest.warns(UserWarning, match="corrupt"):
        assert checkpoint.load_latest_checkpoint(tmp_path).tokens == 100
    assert resolved.identity == f"{previous.resolve()}:{previous.stat().st_size}"
    previous.write_bytes(b"corrupted too")
    with pytest.warns(UserWarning, match="corrupt"), pytest.raises(ConfigError, match="all are corrupt"):
        checkpoint.resolve(str(tmp_path), uri, tmp_path / "runs")


def test_only_the_last_two_checkpoints_are_kept(tmp_path, stub_checkpoint):
    for tokens in (1, 2, 3, 4):
        checkpoint.save_checkpoint(tmp_path, stub_checkpoint(tokens))
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["ckpt-000000000000003.pt", "ckpt-000000000000004.pt"]
    assert not list(tmp_path.glob("*.tmp"))


def test_trained_model_reloads_from_its_checkpoint(tmp_path):
    result = train.run(smoke(tmp_path, "train.tokens=2048"), runs_dir=tmp_path / "runs", progress=False)
    model, cfg = checkpoint.load_model(result.run_dir)
    assert cfg.inference.steps == 4 and model.cfg.kind == "ltm"


def test_unreachable_tracking_server_fails_before_training(tmp_path):
    with pytest.raises(TrackingError, match="cannot reach the MLflow tracking server at http://127.0.0.1:9"):
        train.run(smoke(tmp_path), tracking_uri="http://127.0.0.1:9", runs_dir=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs" / "checkpoints").exists()


@pytest.mark.parametrize("data,message", [
    ("/nonexistent/corpus.txt", "nonexistent"),
    ("no-such-hub-dataset", "no-such-hub-dataset"),
])
def test_bad_data_fails_with_a_clear_message_on_the_command_line(tmp_path, data, message):
    out = subprocess.run(cli(tmp_path, "--data", data), capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == Exit.USAGE
    assert message in out.stderr and "Traceback" not in out.stderr


def test_bad_overrides_fail_on_the_command_line(tmp_path):
    out = subprocess.run(cli(tmp_path, "--set", "inference.step=3"), capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == Exit.USAGE and "unknown config key 'inference.step'" in out.stderr


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(tmp_path):
    args = ["--set", "train.tokens=4096", "--experiment", "d"]
    one = subprocess.run(cli(tmp_path, *args, runs="one"), capture_output=True, text=True, cwd=ROOT)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(29500 + os.getpid() % 1000), *cli(tmp_path, *args, runs="two")[1:]],
                         capture_output=True, text=True, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    a, _ = checkpoint.load_model(next((tmp_path / "one" / "checkpoints").iterdir()))
    b, _ = checkpoint.load_model(next((tmp_path / "two" / "checkpoints").iterdir()))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=name)


def test_the_command_line_reads_a_synthetic_run_against_its_corpus_optimum(tmp_path, capsys):
    from ltm.data import load_blocks, optimal_ppl

    assert train.main(["--preset", "smoke", "--runs-dir", str(tmp_path / "runs"), "--no-progress",
                       "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    cfg = smoke(tmp_path)
    blocks = load_blocks(cfg.data, cfg.model.ctx, "validation")
    full = optimal_ppl(blocks, n_blocks=cfg.train.eval_blocks)
    assert f"Bayes-optimal perplexity on the same {cfg.train.eval_blocks} blocks: {full:.3f}" in capsys.readouterr().out


def test_quiet_drops_the_messages_while_it_works_but_not_the_summary_on_stdout(tmp_path, capsys):
    args = ["--set", "train.tokens=2048"]
    assert train.main(cli(tmp_path, *args, "-q")[3:]) == 0  # trained here; the skips below as a user runs them
    out, err = capsys.readouterr()
    assert out.startswith("FINISHED: run ") and "val/ppl_bound" in out
    again = subprocess.run(cli(tmp_path, *args), capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and again.stdout.startswith("SKIPPED: run ") and "val/ppl_bound" in again.stdout
    assert "already FINISHED" in again.stderr and "already FINISHED" not in again.stdout  # said while it works
    quiet = subprocess.run(cli(tmp_path, *args, "-q"), capture_output=True, text=True, cwd=ROOT)
    assert quiet.returncode == 0 and quiet.stdout.startswith("SKIPPED: run ") and "val/ppl_bound" in quiet.stdout
    assert "already FINISHED" not in quiet.stderr


def test_a_run_says_what_it_does_before_its_first_update(tmp_path, capsys):
    """The data it makes, with counts, then the compile the first update waits for, before any progress; then how
    long that took (the quick start sat at 0% for minutes, without a word)."""
    assert train.main(["--preset", "smoke", "--runs-dir", str(tmp_path / "runs"), "--set", "train.compile=on",
                       "--set", "train.tokens=512", "--set", "train.eval_every=0",
                       "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    err = capsys.readouterr().err.replace("\r", "\n")
    cfg = smoke(tmp_path)
    said = [err.index(text) for text in (
        "generating the train split of synthetic into the token cache",
        f"synthetic corpus: {(cfg.data.synthetic_tokens - 1) // cfg.model.ctx:,} training blocks, "
        f"{cfg.data.val_blocks} validation blocks of {cfg.model.ctx + 1} tokens",
        f"compiling the inner loop and the decoder for this run's shapes (once per process: about "
        f"{objective.CPU_COMPILE_SECONDS} s on an idle 2-core CPU",
        f"| {cfg.tokens_per_update}/",  # the progress bar after the first update
        "compiled: the first update took ")]
    assert said == sorted(said)
