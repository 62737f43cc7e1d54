"""What a GPU run relies on, checked on the CPU: a checkpoint that resumes on any device, MFU per GPU
against the GPU's own peak, Triton's C compiler looked for before anything is created, system
metrics of the run's own GPUs only, and the GPU acceptance script's report."""

import sys
import types
from pathlib import Path

import pytest
import torch

import ltm
import ltm.train as train
from ltm import checkpoint
from ltm.names import Status
from ltm.config import run_preset
from ltm.flops import mfu, peak_flops
from ltm.lifecycle import RunResult
from ltm.objective import c_compiler, check_c_compiler, make_optimizer
from ltm.system_metrics import system_metrics_monitor, visible_nvml_indices
from ltm.tracking import default_tracking_uri

ROOT = Path(__file__).resolve().parents[1]


# -- resuming on a device that is not the CPU ----------------------------------------------------

def test_a_checkpoint_loaded_for_another_device_keeps_its_rng_state_on_the_cpu(tmp_path):
    cfg = run_preset("smoke")
    torch.manual_seed(0)
    model = ltm.build_model(cfg.model)
    optimizer = make_optimizer(model, cfg.train)
    model(torch.randint(0, 64, (2, 8)), torch.zeros(2, 4, 32)).sum().backward()
    optimizer.step()
    checkpoint.save_checkpoint(tmp_path, checkpoint.Checkpoint(
        model=model.state_dict(), optimizer=optimizer.state_dict(), step=1, samples=2, tokens=1, run_id="r",
        config=cfg.to_dict(), model_overrides={"vocab_size": cfg.model.vocab_size}, rng=checkpoint.rng_state()))
    device = torch.device("meta")  # not the CPU, as a GPU is not, and present without one
    state = checkpoint.load_latest_checkpoint(tmp_path, device)
    assert {t.device for t in state.model.values()} == {device}
    before = checkpoint.rng_state()
    checkpoint.restore_rng(state.rng)  # torch.set_rng_state takes nothing but a CPU ByteTensor
    checkpoint.restore_rng(before)
    with device:
        resumed = make_optimizer(ltm.build_model(cfg.model), cfg.train)
    resumed.load_state_dict(state.optimizer)  # the optimiser moves its state to its parameters itself
    assert {s["exp_avg"].device for s in resumed.state.values()} == {device}
    loaded, _ = checkpoint.load_model(tmp_path, device)
    assert {p.device for p in loaded.parameters()} == {device}


# -- MFU per GPU, against its own peak -----------------------------------------------------------

def test_mfu_is_each_gpus_share_of_the_throughput_against_one_gpus_peak():
    assert mfu(8e5, 1e9, 1e15) == pytest.approx(0.8)
    assert mfu(8e5, 1e9, 1e15, devices=8) == pytest.approx(0.1)  # 8 GPUs, 1e5 tokens/s each


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA L4", 121),
])
def test_a_gpus_peak_is_found_by_its_exact_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), 0.0) == tflops * 1e12
    assert peak_flops(torch.device("cuda", 0), 123e12) == 123e12  # train.peak_flops wins


def test_an_unknown_gpu_gets_no_mfu_and_a_warning_that_names_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B200")
    with pytest.warns(UserWarning, match=r"'NVIDIA B200'.*--set train\.peak_flops="):
        assert peak_flops(torch.device("cuda", 0), 0.0) == 0.0
    assert peak_flops(torch.device("cpu"), 0.0) == 0.0


# -- Triton's C compiler ------------------------------------------------------------------------

def executable(folder: Path, name: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_tritons_c_compiler_is_cc_else_gcc_else_clang_on_the_path(tmp_path):
    path = str(tmp_path / "bin")
    assert c_compiler({"PATH": path}) is None
    clang = executable(tmp_path / "bin", "clang")
    assert c_compiler({"PATH": path}) == str(clang)
    gcc = executable(tmp_path / "bin", "gcc")
    assert c_compiler({"PATH": path}) == str(gcc)
    mine = executable(tmp_path / "elsewhere", "mycc")
    assert c_compiler({"PATH": path, "CC": str(mine)}) == str(mine)
    assert c_compiler({"PATH": path, "CC": "no-such-cc"}) is None  # CC is taken as it is, as Triton does


def test_no_c_compiler_is_refused_with_how_to_get_one_and_how_to_do_without(tmp_path):
    with pytest.raises(RuntimeError,
                       match=r"neither gcc nor clang is on PATH; install one .* --set train\.compile=off"):
        check_c_compiler({"PATH": str(tmp_path)})
    with pytest.raises(RuntimeError, match=r"CC='cc-9' is not an executable"):
        check_c_compiler({"PATH": str(tmp_path), "CC": "cc-9"})
    check_c_compiler({"PATH": str(tmp_path), "CC": str(executable(tmp_path, "cc"))})


def test_a_compiling_cuda_run_without_a_c_compiler_stops_before_anything_is_created(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)  # "a GPU": nothing touches it before the check
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the process sees one (ltm.processes.own_gpu)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    cfg = run_preset("smoke").with_overrides([f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(RuntimeError, match=r"--set train\.compile=off"):
        train.run(cfg, runs_dir=tmp_path / "runs", device="cuda", progress=False)
    assert not (tmp_path / "runs").exists()  # no MLflow store, run, lock or checkpoint folder


# -- system metrics of the run's own GPUs --------------------------------------------------------

UUIDS = ["GPU-0aaa-1111", "GPU-1bbb-2222", "GPU-2ccc-3333", "GPU-3ddd-4444"]


@pytest.mark.parametrize("visible, expected", [
    (None, [0, 1, 2, 3]),                                 # not set: every GPU
    ("2", [2]), ("3,1", [3, 1]),                          # indices, in CUDA's order
    ("GPU-2ccc-3333,GPU-0aaa", [2, 0]),                   # UUIDs and unique prefixes of them
    ("", []), ("-1", []), ("NoDevFiles", []),              # none
    ("1,7,2", [1]), ("0,-1,1", [0]), ("1,1", [1]),        # as CUDA, the list ends at an entry naming no new GPU
    ("GPU-", []), ("MIG-2ccc-3333", []),                  # ambiguous; a MIG instance
])
def test_cuda_visible_devices_becomes_nvml_indices(visible, expected):
    assert visible_nvml_indices(visible, UUIDS) == expected


def fake_nvml() -> types.ModuleType:
    """pynvml over the 4 GPUs of UUIDS: GPU i is i * 10% busy."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = type("NVMLError", (Exception,), {})
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(UUIDS)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetUUID = lambda handle: UUIDS[handle]
    nvml.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=10 * handle)
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=(handle + 1) * 1e9, total=80e9)
    nvml.nvmlDeviceGetPowerUsage = lambda handle: 100_000 * (handle + 1)
    nvml.nvmlDeviceGetEnforcedPowerLimit = lambda handle: 700_000
    return nvml


def test_a_runs_system_metrics_cover_only_the_gpus_it_was_given(monkeypatch, tmp_path):
    from mlflow.system_metrics.metrics import gpu_monitor

    nvml = fake_nvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(gpu_monitor, "pynvml", nvml, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-3ddd-4444,1")
    monitor = system_metrics_monitor("run", default_tracking_uri(tmp_path), resumed=False)
    monitor.collect_metrics()
    gpus = {k: v for k, v in monitor.aggregate_metrics().items() if k.startswith("gpu_")}
    assert {k.split("_")[1] for k in gpus} == {"0", "1"}  # two GPUs, numbered as this process sees them
    assert (gpus["gpu_0_utilization_percentage"], gpus["gpu_1_utilization_percentage"]) == (30, 10)


# -- the GPU acceptance script -------------------------------------------------------------------

# (its phases, the refusal without a GPU and its tolerances: tests/test_gpu_check.py)

@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def test_the_gpu_check_reads_the_numbers_a_training_command_ends_with(gpu_check, monkeypatch, capsys, tmp_path):
    metrics = {"train/loss": 2.25, "val/nll": 2.5, "val/ppl_bound": 12.375}  # exact in the 6 digits printed
    monkeypatch.setattr(train, "run", lambda cfg, **kwargs: RunResult(Status.FINISHED, "id", metrics, tmp_path))
    assert train.main(["--preset", "smoke", "--data", str(tmp_path / "text.txt")]) == 0
    read = gpu_check.final_metrics(capsys.readouterr().out)
    assert read == metrics
    assert gpu_check.relative_differences(read, {**read, "val/nll": 2.6}) == pytest.approx(
        {"val/ppl_bound": 0.0, "val/nll": 0.04, "train/loss": 0.0})


@pytest.mark.parametrize("phase, section, shown", [
    ("cuda_tests", {"summary": "9 passed in 80.0s"}, "9 passed in 80.0s"),
    ("mfu", {"size": "ltm-s", "peak_tflops": None, "matmul_bf16_tflops": 700.0, "batch": 32, "T": 16,
             "tokens_per_s": 123456.0, "mfu": None},
     "ltm-s: T=16, batch 32 x ctx 1024, compiled, bf16: 123,456 tokens/s per GPU, MFU - (dense bf16 peak not in "
     "ltm.flops.GPU_PEAKS"),
    ("inner", {"attention": "flex", "batch": 8, "max_abs_difference_fp32": {"mu": 1e-5, "logvar": 2e-5},
               "ms_per_inner_step_bf16": {"eager": 30.0, "compiled": 10.0}, "compiled_speedup": 3.0},
     "attention flex: fp32 max |compiled - eager| mu 1.0e-05, logvar 2.0e-05; bf16 inner step 30.0 ms eager"),
])
def test_the_gpu_check_reports_each_phase_on_one_screen(gpu_check, phase, section, shown):
    name = gpu_check.PHASES[phase][0]
    report = {"phase": phase, "device": "NVIDIA H200", "torch": "2.13.0", "date": "today",
              "sections": {name: {"ok": True, "seconds": 81.0, **section}}}
    text = gpu_check.markdown(report)
    assert f"## {name}: PASS (81 s)" in text and shown in text and len(text.splitlines()) <= 10
