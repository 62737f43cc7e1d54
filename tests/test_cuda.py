"""The CUDA paths against their CPU twins: training, the evaluation tasks, posterior inference.

Skipped without a GPU. Further GPU checks (the compiled inner loop, FlexAttention) belong here:
the fixtures `text_run`, `trained_on_cuda`, `same_noise`, `gsm8k_folder` and the helper
`evaluate_task` are theirs to reuse.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import studies.tasks as tasks
from ltm import evaluate, posterior
from ltm.checkpoint import load_latest_checkpoint, load_model, restore_rng, rng_state
from ltm.config import RunConfig, run_preset
from ltm.names import Status
from ltm.posterior import NoiseSource, infer_posterior
from ltm.tracking import default_tracking_uri
from ltm.lifecycle import RunResult
from ltm.objective import decoder_loss
from ltm.train import run
from studies.messages import CheckpointSource, Point, TrialContext
from studies.study import Task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (a CUDA build of torch that sees one)")

CUDA = torch.device("cuda", 0)
WORDS = "the cat sat on a mat while dogs ran past old red barns near green hills and blue lakes".split()


def write_text(path: Path, n_words: int, seed: int) -> Path:
    """A text file of seeded random words in paragraphs of 50."""
    g = torch.Generator().manual_seed(seed)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (n_words,), generator=g)]
    path.write_text("\n\n".join(" ".join(words[i:i + 50]) for i in range(0, n_words, 50)))
    return path


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> tuple[RunConfig, Path]:
    """The smoke recipe on a local text file with a small BPE, and another text file to evaluate on."""
    folder = tmp_path_factory.mktemp("text")
    train = write_text(folder / "train.txt", 20_000, 0)
    (folder / "other").mkdir()
    other = write_text(folder / "other" / "eval.txt", 3_000, 1)
    cfg = run_preset("smoke").with_overrides({"data.name": str(train), "data.tokenizer": "bpe",
                                             "data.bpe_vocab_size": 300, "data.cache_dir": str(folder / "cache")})
    return cfg, other


@pytest.fixture(scope="module")
def trained_on_cuda(text_run, tmp_path_factory) -> tuple[Path, RunResult]:
    """The runs folder and result of `text_run` trained on the GPU (once per module)."""
    runs = tmp_path_factory.mktemp("runs")
    return runs, run(text_run[0], runs_dir=runs, experiment="cuda", progress=False, device="cuda")


class _NoiseDrawnOnCpu(NoiseSource):
    def __init__(self, seeds, shape: tuple[int, ...], device: torch.device) -> None:
        super().__init__(seeds, shape, torch.device("cpu"))
        self.target = device

    def draw(self) -> torch.Tensor:
        return super().draw().to(self.target)


@pytest.fixture
def same_noise(monkeypatch) -> None:
    """Inference and scoring noise drawn on the CPU whatever the device: CUDA's generators give other
    numbers for the same seeds, which a comparison with the CPU would mistake for arithmetic error."""
    for module in (posterior, evaluate):
        monkeypatch.setattr(module, "NoiseSource", _NoiseDrawnOnCpu)


def test_smoke_training_on_cuda_finishes_and_its_checkpoint_reloads(trained_on_cuda):
    runs, result = trained_on_cuda
    assert result.status == Status.FINISHED.value and math.isfinite(result.metrics["val/ppl_bound"])
    assert MlflowClient(default_tracking_uri(runs)).get_run(result.run_id).data.tags["device"] == str(CUDA)
    on_gpu, _ = load_model(result.run_dir, device="cuda")
    on_cpu, _ = load_model(result.run_dir)
    assert {p.device for p in on_gpu.parameters()} == {CUDA}
    for (name, a), b in zip(on_gpu.state_dict().items(), on_cpu.state_dict().values()):
        assert torch.equal(a.cpu(), b) and torch.isfinite(b).all(), name


def test_a_checkpoint_loads_for_the_gpu_with_its_rng_state_on_the_cpu(trained_on_cuda):
    state = load_latest_checkpoint(trained_on_cuda[1].run_dir, CUDA)  # as a CUDA run resumes
    assert {t.device for t in state.model.values()} == {CUDA} and state.rng["torch"].device.type == "cpu"
    before = rng_state()
    restore_rng(state.rng)
    restore_rng(before)


def evaluate_task(task: dict, trained_on_cuda, key: str) -> tuple[dict, dict]:
    """(metrics, MLflow tags) of an evaluation task (`studies.tasks`) on the trained checkpoint."""
    runs, trained = trained_on_cuda
    point = Point(key=key, config={}, label={}, task=Task.from_dict(task),
                  source=CheckpointSource(str(trained.run_dir), trained.run_id))
    context = TrialContext(tracking_uri=default_tracking_uri(runs), experiment="cuda", runs_dir=str(runs),
                           parent_run_id=None)
    result = tasks.run_task(point, context)
    assert result.status == Status.FINISHED, result.reason
    return result.metrics, MlflowClient(context.tracking_uri).get_run(result.run_id).data.tags


@pytest.fixture
def gsm8k_folder(tmp_path) -> Path:
    """A GSM8K folder (train.jsonl, test.jsonl) of two short problems."""
    problems = [{"question": f"{a} + {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"} for a in (1, 2)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(p) for p in problems))
    return tmp_path


@pytest.mark.parametrize("task", [
    {"name": "generation", "samples": 2, "length": 8, "prefix": 4, "prior_temperatures": [0.5, 1.0]},
    {"name": "gsm8k", "shots": [0, 1], "pass_k": 2, "problems": 2, "max_new_tokens": 4},
], ids=["generation", "gsm8k"])
def test_evaluation_tasks_run_on_the_gpu_they_see(task, trained_on_cuda, gsm8k_folder):
    task = {**task, "data": str(gsm8k_folder)} if task["name"] == "gsm8k" else task
    metrics, tags = evaluate_task(task, trained_on_cuda, f"{task['name']}-on-cuda")
    assert tags["device"] == str(CUDA) and all(math.isfinite(v) for v in metrics.values())


def test_zero_shot_task_on_cuda_runs_in_bf16_and_matches_the_cpu(trained_on_cuda, text_run, same_noise, monkeypatch):
    real_zero_shot, seen = tasks.EVALUATORS["zero_shot"], {}

    def zero_shot(model, cfg, task, verify):
        device = next(model.parameters()).device
        seen[device.type] = (device, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        return real_zero_shot(model, cfg, task, verify)

    monkeypatch.setitem(tasks.EVALUATORS, "zero_shot", zero_shot)
    task = {"name": "zero_shot", "corpora": [str(text_run[1])], "max_blocks": 8, "iw_samples": 4}
    results = {}
    for device in (torch.device("cpu"), CUDA):
        monkeypatch.setattr(tasks, "trial_device", lambda device=device: device)
        results[device.type] = evaluate_task(task, trained_on_cuda, f"zero-shot-on-{device.type}")
    (on_cpu, cpu_tags), (on_gpu, gpu_tags) = results["cpu"], results["cuda"]
    assert (cpu_tags["device"], gpu_tags["device"]) == ("cpu", str(CUDA))
    assert seen["cpu"][:2] == (torch.device("cpu"), False)  # "auto": fp32 on a CPU
    assert seen["cuda"] == (CUDA, True, torch.bfloat16)
    compared = {k for k in on_cpu if not k.endswith("/seconds")}
    assert "zeroshot/other-eval/ppl_bound" in compared and compared <= set(on_gpu)
    # bf16 autocast against fp32: a CPU's bf16 autocast moves these by ~5e-4 relative; 2e-2 is loose.
    assert {k: on_gpu[k] for k in compared} == pytest.approx({k: on_cpu[k] for k in compared}, rel=2e-2)


def test_inference_on_cuda_matches_the_cpu_in_fp32(smoke_model, tokens, same_noise, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 means fp32 whatever set it
    cfg = run_preset("smoke").inference
    seeds = [0, 1, 2]
    on_cpu = infer_posterior(smoke_model, tokens, cfg, seeds=seeds)
    on_gpu = infer_posterior(copy.deepcopy(smoke_model).to(CUDA), tokens.to(CUDA), cfg, seeds=seeds)
    for name in ("mu", "logvar", "z", "trace"):
        torch.testing.assert_close(getattr(on_gpu, name).cpu(), getattr(on_cpu, name), atol=1e-4, rtol=1e-4)


# -- the compiled inner loop and FlexAttention on the GPU ----------------------------------------

def test_flex_attention_forward_and_backward_equal_the_dense_mask_on_cuda():
    from ltm.attention import plan_window, window_attention

    T, w = 1024, 256
    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (torch.randn(2, 4, T, 64, device=CUDA, generator=g, requires_grad=True) for _ in range(3))
    out, grads = {}, {}
    for kind in ("dense", "flex"):
        out[kind] = window_attention(q, k, v, plan_window(T, w, 4, CUDA, kind))
        grads[kind] = torch.autograd.grad(out[kind].square().sum(), (q, k, v))
    assert plan_window(T, w, 4, CUDA).kind == "flex"  # what auto picks on a GPU
    torch.testing.assert_close(out["flex"], out["dense"], atol=1e-4, rtol=1e-4)
    for a, b in zip(grads["flex"], grads["dense"]):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_the_compiled_inner_loop_matches_eager_on_cuda(monkeypatch):
    import ltm

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = ltm.build_model(ltm.ModelConfig(vocab_size=300, n_layers=2, d_model=64, n_heads=2, ctx=512, window=128,
                                            n_latents=4)).to(CUDA)
    icfg = ltm.InferenceConfig(steps=4)
    torch._dynamo.reset()
    for seed in (1, 2):
        # The first batch compiles what each call needs (eager FlexAttention, a graph per grad mode: the
        # inner loop's stem runs without grad, the layers after it with); the second must reuse them all.
        with torch._dynamo.config.patch(error_on_recompile=seed == 2):  # torch restores the option itself
            tokens = torch.randint(0, 300, (4, 513), generator=torch.Generator().manual_seed(seed)).to(CUDA)
            eager = infer_posterior(model, tokens, icfg, seeds=range(4))
            compiled = infer_posterior(model, tokens, icfg, seeds=range(4), compiled=True)
            torch.testing.assert_close(compiled.mu, eager.mu, atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(compiled.logvar, eager.logvar, atol=1e-3, rtol=1e-3)
            # the decoder update traces the whole forward, FlexAttention's block mask included
            grads = []
            for mode in (False, True):
                model.zero_grad(set_to_none=True)
                decoder_loss(model, tokens, icfg, list(range(4)), compiled=mode)[0].backward()
                grads.append([p.grad.clone() for p in model.parameters()])
            for a, b in zip(*grads):
                torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-2)
