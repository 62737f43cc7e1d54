"""The evaluation studies end to end (generation, zero-shot, GSM8K): train or take checkpoints, evaluate,
track in MLflow, skip what finished; and their bad options fail before anything starts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from studies.generation import STUDY as GENERATION
from studies.icl_gsm8k import STUDY as ICL_GSM8K
from ltm.names import Exit
from studies.launcher import main
from studies.study import GenerationTask, Gsm8kTask, Task, ZeroShotTask
from studies.zero_shot import STUDY as ZERO_SHOT

ROOT = Path(__file__).resolve().parents[1]


def study(name: str, runs: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "studies" / f"{name}.py"), "--preset", "smoke",
                           "--runs-dir", str(runs), *args], cwd=runs.parent, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def runs_of(runs: Path, experiment: str) -> dict[str, list]:
    """The experiment's runs by role: train, eval, study."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    out = {"train": [], "eval": [], "study": []}
    for r in client.search_runs([exp.experiment_id]):
        out[r.data.tags.get("ltm.role", "train")].append(r)
    return out


def artifacts(runs: Path, run) -> list[str]:
    from mlflow.tracking import MlflowClient

    return [f.path for f in MlflowClient(f"sqlite:///{runs / 'mlflow.db'}").list_artifacts(run.info.run_id)]


@pytest.mark.slow
def test_generation_study_trains_evaluates_and_skips_what_finished(tmp_path):
    runs = tmp_path / "runs"
    study("generation", runs)
    found = runs_of(runs, "generation")
    assert len(found["train"]) == 2 and len(found["eval"]) == 2 and len(found["study"]) == 1
    assert {r.info.status for r in found["train"] + found["eval"]} == {"FINISHED"}
    ltm_eval = next(r for r in found["eval"] if r.data.tags["model.kind"] == "ltm")
    assert {"gen/uncond_s0.5/entropy", "gen/uncond_s1/entropy", "gen/uncond_s1.5/entropy",
            "gen/cond/entropy"} <= set(ltm_eval.data.metrics)
    assert ltm_eval.data.tags["ltm.source_run_id"] in {r.info.run_id for r in found["train"]}
    assert "samples.md" in artifacts(runs, ltm_eval)

    study("generation", runs)  # started again: nothing new
    again = runs_of(runs, "generation")
    assert (len(again["train"]), len(again["eval"]), len(again["study"])) == (2, 2, 1)

    # a checkpoint by path, with the AR checkpoint as the reference for generative perplexity
    ar_key = next(r for r in found["train"] if r.data.params["model.kind"] == "ar").data.tags["ltm.run_key"]
    ltm_run = next(r for r in found["train"] if r.data.params["model.kind"] == "ltm")
    ltm_path = runs / "checkpoints" / ltm_run.data.tags["ltm.run_key"]  # its training run is found by key
    study("generation", runs, "--checkpoint", str(ltm_path), "--task", f"reference={runs / 'checkpoints' / ar_key}")
    evals = runs_of(runs, "generation")["eval"]
    scored = [r for r in evals if "gen/cond/gen_ppl" in r.data.metrics]
    assert len(evals) == 3 and len(scored) == 1 and scored[0].data.metrics["gen/cond/gen_ppl"] > 1
    assert scored[0].data.tags["ltm.source_run_id"] == ltm_run.info.run_id


@pytest.mark.slow
def test_zero_shot_study_on_local_text(tmp_path):
    words = "the cat sat on a mat while dogs ran past old red barns".split()
    train, other = tmp_path / "train.txt", tmp_path / "held" / "out.txt"
    other.parent.mkdir()
    train.write_text("\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(60)) for i in range(300)))
    other.write_text("\n\n".join(" ".join(words[(i * 5 + j) % len(words)] for j in range(60)) for i in range(40)))
    runs = tmp_path / "runs"
    study("zero_shot", runs, "--data", str(train), "--task", f"corpora={other}", "--set", f"data.cache_dir={tmp_path}")
    evals = runs_of(runs, "zero_shot")["eval"]
    assert len(evals) == 2
    for r in evals:
        m = r.data.metrics
        assert m["zeroshot/held-out/blocks"] == 8 and m["zeroshot/held-out/ppl_bound"] > 1
        if r.data.tags["model.kind"] == "ar":
            assert m["zeroshot/held-out/kl"] == 0


@pytest.mark.slow
def test_icl_gsm8k_study_then_zero_shot_of_its_checkpoint_by_run_id(tmp_path, local_data):
    runs, gsm8k = tmp_path / "runs", local_data("gsm8k")
    proc = study("icl_gsm8k", runs, "--data", str(gsm8k))
    assert "gsm8k/k0/pass2_substring" in proc.stdout
    found = runs_of(runs, "icl_gsm8k")
    assert len(found["eval"]) == 2
    for r in found["eval"]:
        assert {f"gsm8k/k{k}/{m}" for k in (0, 1) for m in ("pass2_substring", "pass2_exact", "pass1_exact",
                                                            "shots_used")} <= set(r.data.metrics)
        assert r.data.params["task.shots_from"] == "train"
        assert {"gsm8k_k0.json", "gsm8k_k1.json"} <= set(artifacts(runs, r))

    trained = next(r for r in found["train"] if r.data.params["model.kind"] == "ltm")
    study("zero_shot", runs, "--experiment", "icl_gsm8k", "--checkpoint", trained.info.run_id,
          "--task", f"corpora={gsm8k / 'test.jsonl'}", "--task", "max_blocks=2")
    zs = [r for r in runs_of(runs, "icl_gsm8k")["eval"] if r.data.tags["ltm.task"] == "zero_shot"]
    assert len(zs) == 1 and zs[0].data.tags["ltm.source_run_id"] == trained.info.run_id
    assert zs[0].data.metrics["zeroshot/gsm8k-test/blocks"] == 2


@pytest.mark.parametrize("study_def, args, message", [
    (GENERATION, ["--task", "colour=red"], "--task takes KEY=VALUE with KEY one of samples"),
    (GENERATION, ["--task", "samples=0"], "samples must be a positive integer"),
    (GENERATION, ["--checkpoint", "/nowhere/ckpt"], "is neither a checkpoint file or folder, nor a run key"),
    (ZERO_SHOT, ["--task", "corpora=/nowhere/x.txt"], "no such file or folder"),
    (ICL_GSM8K, ["--data", "/nowhere/gsm8k"], "not a folder with train.jsonl and test.jsonl"),
    (ICL_GSM8K, ["--data", "{gsm8k}", "--task", "shots=-1"], "shots must be a list of integers >= 0"),
    (ICL_GSM8K, ["--data", "{gsm8k}", "--task", "shots_from=val"], "shots_from must be train or test"),
], ids=["unknown-task-key", "bad-count", "missing-checkpoint", "missing-corpus", "missing-gsm8k", "bad-shots",
        "bad-shots-from"])
def test_bad_evaluation_options_fail_before_launch(tmp_path, capsys, study_def, args, message):
    folder = _tiny_gsm8k(tmp_path / "gsm8k")
    args = [a.replace("{gsm8k}", str(folder)) for a in args]
    code = main(study_def, ["--preset", "smoke", "--runs-dir", str(tmp_path / "runs"), *args])
    assert code == Exit.USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs" / "ray").exists()


def test_training_studies_take_no_evaluation_options(tmp_path, capsys):
    from studies.inference_scaling import STUDY

    with pytest.raises(SystemExit):
        main(STUDY, ["--preset", "smoke", "--checkpoint", "x", "--runs-dir", str(tmp_path)])
    assert "unrecognized arguments: --checkpoint" in capsys.readouterr().err


def test_dry_run_shows_the_evaluation(tmp_path, capsys):
    assert main(GENERATION, ["--preset", "smoke", "--runs-dir", str(tmp_path), "--dry-run", "--task", "length=8"]) == 0
    out = capsys.readouterr().out
    task = json.loads(out.split("evaluation on each point's model, trained first: ", 1)[1].splitlines()[0])
    assert task["length"] == 8 and task["name"] == "generation"


def test_an_evaluation_runs_on_a_visible_gpu_else_the_cpu(monkeypatch):
    import torch

    from studies.tasks import trial_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for visible in (1, 4):  # the GPU it was given, or the first of those it sees
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        assert trial_device() == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trial_device() == torch.device("cpu")


def test_run_task_loads_the_model_on_the_trial_device_and_tags_the_run_with_it(tmp_path, monkeypatch, stub_checkpoint):
    import torch
    from mlflow.tracking import MlflowClient

    import studies.tasks as tasks
    from ltm.checkpoint import save_checkpoint
    from ltm.config import run_preset
    from ltm.model import build_model
    from ltm.names import Status
    from ltm.tracking import default_tracking_uri
    from studies.messages import CheckpointSource, Point, TrialContext
    from studies.study import GenerationTask

    runs = tmp_path / "runs"
    cfg = run_preset("smoke")
    checkpoint = save_checkpoint(tmp_path / "untrained", stub_checkpoint(0, config=cfg.to_dict(),
                                                                          model=build_model(cfg.model).state_dict()))
    real_load_model, asked, seen = tasks.load_model, [], {}

    def load_model(path, device, verify):
        asked.append(device)
        return real_load_model(path, device, verify)

    def evaluator(model, cfg, task, verify):
        seen["device"] = next(model.parameters()).device
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return {"probe/value": 1.0}, {}

    monkeypatch.setattr(tasks, "trial_device", lambda model=None: torch.device("cpu"))
    monkeypatch.setattr(tasks, "load_model", load_model)
    monkeypatch.setitem(tasks.EVALUATORS, "generation", evaluator)
    point = Point(key="probe", config=cfg.to_dict(), label={}, task=GenerationTask(),
                  source=CheckpointSource(str(checkpoint)))
    context = TrialContext(tracking_uri=default_tracking_uri(runs), experiment="e", runs_dir=str(runs),
                           parent_run_id=None)
    result = tasks.run_task(point, context)
    assert result.status == Status.FINISHED and result.metrics["probe/value"] == 1.0
    assert asked == ["cpu"] and seen == {"device": torch.device("cpu"), "autocast": False}  # "auto": fp32 on a CPU
    assert MlflowClient(context.tracking_uri).get_run(result.run_id).data.tags["device"] == "cpu"


def test_an_evaluation_that_failed_is_rerun_in_its_own_run_and_then_skipped(tmp_path, monkeypatch, stub_checkpoint):
    from mlflow.tracking import MlflowClient

    import studies.tasks as tasks
    from ltm.checkpoint import save_checkpoint
    from ltm.config import run_preset
    from ltm.model import build_model
    from ltm.names import Status
    from ltm.tracking import default_tracking_uri
    from studies.messages import CheckpointSource, Point, TrialContext
    from studies.study import GenerationTask

    runs = tmp_path / "runs"
    cfg = run_preset("smoke")
    checkpoint = save_checkpoint(tmp_path / "untrained", stub_checkpoint(0, config=cfg.to_dict(),
                                                                          model=build_model(cfg.model).state_dict()))
    outcomes = [RuntimeError("the evaluator broke"), ({"probe/value": 2.0}, {})]

    def evaluator(model, cfg, task, verify):
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setitem(tasks.EVALUATORS, "generation", evaluator)
    point = Point(key="probe", config=cfg.to_dict(), label={}, task=GenerationTask(),
                  source=CheckpointSource(str(checkpoint)))
    context = TrialContext(tracking_uri=default_tracking_uri(runs), experiment="e", runs_dir=str(runs),
                           parent_run_id=None)
    with pytest.raises(RuntimeError, match="the evaluator broke"):
        tasks.run_task(point, context)
    client = MlflowClient(context.tracking_uri)
    (failed,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert failed.info.status == "FAILED"
    rerun = tasks.run_task(point, context)  # the same run, reopened
    assert rerun.status == Status.FINISHED and rerun.run_id == failed.info.run_id
    assert "ltm.status_reason" not in client.get_run(rerun.run_id).data.tags  # the failure's reason is cleared
    again = tasks.run_task(point, context)
    assert again.status == Status.SKIPPED and again.run_id == rerun.run_id and again.metrics["probe/value"] == 2.0


def test_evaluation_keys_are_those_of_the_dict_tasks_before(tmp_path):
    """An evaluation's run key hashes its checkpoint's identity and its task as JSON: the typed tasks give
    the JSON, so the keys, that the dict tasks gave (pinned at commit 7b5a446), and finished evaluations are
    still found."""
    from studies.plan import plan
    from studies.tasks import evaluation_key

    identity = "0123456789abcdef"
    assert json.dumps([identity, GENERATION.presets["smoke"].task.to_dict()], sort_keys=True) == (
        '["0123456789abcdef", {"length": 16, "name": "generation", "prefix": 8, "prior_temperatures": [0.5, 1.0, 1.5], '
        '"reference": null, "samples": 4, "seed": 0, "steps": null, "top_p": null}]')
    assert evaluation_key(identity, GENERATION.presets["smoke"].task.to_dict()) == "a162abdd8ed80202"
    assert evaluation_key(identity, ICL_GSM8K.presets["micro"].task.to_dict()) == "646abf9d190dee7c"
    assert evaluation_key(identity, ZERO_SHOT.presets["paper"].task.to_dict()) == "6c8cd793fb5cfaa1"
    planned = plan(GENERATION, ["--preset", "smoke", "--runs-dir", str(tmp_path), "--dry-run",
                                "--task", "prior_temperatures=1,2", "--task", "top_p=0.9"])
    assert [p.key for p in planned.points] == ["cb6aad27842964b3", "396dd01bb2c0efb2"]  # 1, 2 stay integers


@pytest.mark.parametrize("make, message", [
    (lambda: GenerationTask(samples=0), "task generation: samples must be a positive integer, got 0"),
    (lambda: Gsm8kTask(problems="all"), "task gsm8k: problems must be a positive integer, got 'all'"),
    (lambda: Gsm8kTask(shots=[0, -1]), "task gsm8k: shots must be a list of integers >= 0, got [0, -1]"),
    (lambda: Gsm8kTask(shots_from="val"), "task gsm8k: shots_from must be train or test, got 'val'"),
    (lambda: ZeroShotTask(corpora=[]), "task zero_shot: corpora is empty; name hub corpora or local files"),
    (lambda: Task.from_dict({"name": "sums"}), "unknown task 'sums'; known: gsm8k, zero_shot, generation"),
    (lambda: Task.from_dict({"name": "generation", "colour": "red"}), "task generation: unknown arguments ['colour']"),
], ids=["not-positive", "not-an-integer", "bad-shots", "bad-shots-from", "no-corpora", "unknown-task",
        "unknown-argument"])
def test_a_task_is_checked_when_it_is_made(make, message):
    from ltm.config import ConfigError

    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value) == message


def _tiny_gsm8k(folder: Path) -> Path:
    """A GSM8K-shaped folder of one problem per split: enough to plan (not to train) an icl_gsm8k study."""
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    return folder


def test_an_evaluation_point_crosses_a_process_boundary_unchanged(tmp_path):
    from studies.messages import CheckpointSource, Point, TrainSource
    from studies.plan import plan

    gsm8k = _tiny_gsm8k(tmp_path / "gsm8k")
    trained_first = plan(ICL_GSM8K, ["--preset", "smoke", "--runs-dir", str(tmp_path), "--dry-run", "--data",
                                     str(gsm8k)]).points
    given = Point(key="k", config={}, label={}, task=ZeroShotTask(corpora=["ptb"]), source=CheckpointSource("/c", "r"))
    for point in [*trained_first, given]:
        sent = json.dumps(point.to_dict())
        received = Point.from_dict(json.loads(sent))
        assert (received.task, received.source) == (point.task, point.source) and json.dumps(received.to_dict()) == sent
    assert isinstance(trained_first[0].source, TrainSource) and trained_first[0].task.data == str(gsm8k.resolve())
    assert trained_first[0].to_dict()["source"] == {"train": True, "train_key": trained_first[0].source.train_key}
    assert given.to_dict()["source"] == {"checkpoint": "/c", "run_id": "r"}


# -- an evaluation checks what training checks, before its setup (issue 31) ---------------------------

def paper_point(source):
    """An evaluation point of the paper's shape (LTM-S: context 1024, window 256)."""
    from ltm.config import run_preset
    from studies.messages import Point
    from studies.study import GenerationTask

    return Point(key="paper-eval", config=run_preset("ltm-s").to_dict(), label={}, task=GenerationTask(),
                 source=source)


def test_an_evaluation_takes_flex_attention_on_a_gpu_at_the_paper_shape_and_needs_a_c_compiler(tmp_path):
    import torch

    from ltm.config import RunConfig
    from ltm.objective import check_window_compiler as check_evaluation
    from studies.messages import TrainSource

    cc = tmp_path / "gcc"
    cc.write_text("#!/bin/sh\n")
    cc.chmod(0o755)
    point = RunConfig.from_dict(paper_point(TrainSource("k")).config).model
    assert check_evaluation(point, torch.device("cuda", 0), {"PATH": str(tmp_path)}) == "flex"
    assert check_evaluation(point, torch.device("cpu"), {"PATH": ""}) == "chunked"  # nothing compiles on a CPU
    with pytest.raises(RuntimeError) as err:
        check_evaluation(point, torch.device("cuda", 0), {"PATH": str(tmp_path / "empty")})
    assert ("runs on cuda:0 with FlexAttention (context 1024, window 256), which Triton compiles with a C "
            "compiler, and neither gcc nor clang is on PATH; install one (e.g. `apt install gcc`") in str(err.value)
    assert "or set CC to it" in str(err.value)
    with pytest.raises(RuntimeError, match="CC='cc-9' is not an executable"):
        check_evaluation(point, torch.device("cuda", 0), {"PATH": str(tmp_path), "CC": "cc-9"})


def test_an_evaluation_on_a_gpu_without_a_c_compiler_fails_before_training_or_loading(tmp_path, monkeypatch):
    import torch

    import studies.tasks as tasks
    from ltm.names import Status
    from ltm.tracking import default_tracking_uri
    from studies.messages import TrainSource, TrialContext

    setup = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(tasks, "_trained_checkpoint", lambda *a: setup.append("train") or (None, None, None))
    monkeypatch.setattr(tasks, "load_model", lambda *a, **k: setup.append("load"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc, no clang
    monkeypatch.delenv("CC", raising=False)
    runs = tmp_path / "runs"
    context = TrialContext(tracking_uri=default_tracking_uri(runs), experiment="e", runs_dir=str(runs),
                           parent_run_id=None)
    result = tasks.run_task(paper_point(TrainSource("k")), context)
    assert result.status == Status.FAILED and result.run_id is None and setup == []
    assert "FlexAttention (context 1024, window 256)" in result.reason and "neither gcc nor clang" in result.reason


@pytest.mark.skipif(__import__("shutil").which("gcc") is None and __import__("shutil").which("clang") is None,
                    reason="FlexAttention on a CPU is compiled by Inductor, which needs a C compiler")
def test_the_paper_shapes_decoder_forward_with_flex_attention_runs_on_a_cpu_and_equals_the_chunked_form():
    """What an evaluation's forward takes on a GPU (flex at context 1024, window 256), run on the CPU where it
    runs there (forward only: FlexAttention has no backward on a CPU), at a narrow width."""
    import dataclasses

    import torch

    import ltm
    from ltm.config import run_preset

    cfg = dataclasses.replace(run_preset("ltm-s").model, vocab_size=64, n_layers=2, d_model=64, n_heads=4,
                              n_latents=4)
    assert (cfg.ctx, cfg.window) == (1024, 256)
    torch.manual_seed(0)
    model = ltm.build_model(cfg).eval()
    tokens, z = torch.randint(0, 64, (1, 1024)), torch.randn(1, 4, 64)
    out = {}
    for kind in ("chunked", "flex"):
        model.attention = kind
        with torch.no_grad():
            out[kind] = model(tokens, z)
    torch.testing.assert_close(out["flex"], out["chunked"], atol=1e-4, rtol=1e-4)
