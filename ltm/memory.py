"""Peak memory per process of a training update, known before the run: one audited place.

What is counted: every tensor storage the process holds at the worst moment of a steady-state
decoder update, as `ltm.loop.train_step` runs it (`_update`): the weights, the AdamW state (two fp32
moments), the gradients (held through the micro-batch when the update accumulates several, else
allocated by its backward), the batch, the inner loop (mu, logvar and their moments, the stem, an
inner step's graph and its backward while the previous step's gradients of mu and logvar are still
referenced), then the decoder forward at z_T with its saved activations, its backward, the
gradient clip and the AdamW step. At the precision the point runs at: fp32, or bf16 autocast
(weights stay fp32, autocast keeps a bf16 copy of each trained weight while the forward runs,
matmul outputs are bf16, the loss of the logits is computed in fp32).

How: the update runs on fake tensors (`torch._subclasses.FakeTensorMode`: shapes, dtypes and
autograd, no data and no arithmetic) under a dispatch mode that adds up the bytes of the storages
alive after every op and keeps the maximum (`_LiveStorages`). Nothing is modelled by hand: the
model code, autograd's saved tensors and autocast's casts are those of a real step. The window's
attention takes the form a CPU picks (`ltm.attention.plan_window`).

Cheap: the peak does not grow with the inner steps T past two (each step frees the graph of the one
before; only the loop's record of the objective grows, by 4 bytes per sequence and step), so two
are traced. It is affine in the micro-batch and in the number of layers (each extra sequence or
layer adds the same tensors), and the latents add bytes per sequence and per layer. So a model of
up to 2 layers is traced at its size, and a deeper one at (micro-batch, layers) in {1, 2}^2 with one
latent per layer plus (2, 2) with two, interpolated to its sizes per phase (forward and backward;
clip and optimiser step), the peak being the larger phase. Traces are cached per shape.
tests/test_memory.py checks the interpolation against full traces of the paper's shapes and the
estimate against the measured peak.

Measured (`measure_peak_bytes`): the same update run for real on this CPU under torch.profiler with
`profile_memory=True`. c10's CPU allocator reports every allocation and free of tensor memory to it,
kernels' own workspaces included (which the fake trace does not see); the running sum of the
allocations made since the model was built, less their frees, is what the process holds in tensors
at each moment, and its maximum during the update is the measured peak. It owes nothing to the
dispatch mode the estimate uses. Neither sees BLAS's private scratch outside c10.

On a GPU this is the eager program at bf16 autocast, with the CPU's windowed form and foreach AdamW.
The program there should hold less (not yet measured on a GPU): FlexAttention saves q, k, v, the
output and the log-sum-exp where the chunked form also saves each query block's keys and values,
fused AdamW needs no temporaries, and torch.compile (the default on CUDA) recomputes cheap ops
rather than saving them. Not counted: the CUDA context, cuBLAS workspaces, the caching allocator's
rounding and fragmentation (`studies.costs` keeps a margin for them), with several processes the
flat gradient copy of the all-reduce (4 bytes per parameter, after the backward), the validation
batches, and the evaluations (the inner loop at train.eval_batch_size, without a decoder update).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ltm.config import InferenceConfig, ModelConfig, RunConfig, TrainConfig
from ltm.model import build_model
from ltm.objective import autocast_for, decoder_loss, make_optimizer

Precision = Literal["fp32", "bf16"]
PHASES = ("forward_backward", "optimizer")
"""The update's phases, each with its own peak: the micro-batch's decoder_loss (inner loop and decoder
forward) and backward; the gradient clip and the AdamW step."""


def precision_on(device_type: str, setting: str) -> Precision:
    """The precision train.precision=`setting` runs at on a device type (`ltm.objective.autocast_for`)."""
    return "bf16" if setting == "bf16" or (setting == "auto" and device_type == "cuda") else "fp32"


class _LiveStorages(TorchDispatchMode):
    """Bytes of the tensor storages alive, and their maximum per phase, as ops create and drop them.

    A storage is counted once (views share it) when an op first returns it, and uncounted when
    Python drops its last reference (a weakref callback; torch keeps one Python object per storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.phase: str | None = None
        self.peaks: dict[str, int] = {}
        self._storages: dict[int, weakref.ref] = {}

    def start(self, phase: str) -> None:
        self.phase = phase
        self.peaks[phase] = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        return out

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._storages:
            return
        size = storage.nbytes()
        self.live += size
        if self.phase is not None:
            self.peaks[self.phase] = max(self.peaks[self.phase], self.live)

        def gone(_ref, key=key, size=size) -> None:
            self.live -= size
            self._storages.pop(key, None)

        self._storages[key] = weakref.ref(storage, gone)


# -- one update, as ltm.loop.train_step runs it ---------------------------------------------------

def _prepare(cfg: RunConfig, micro_batch: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and optimiser as a later update of one process finds them: AdamW's state exists, and
    the gradients do when the update accumulates micro-batches (the later ones add into them)."""
    accumulate = micro_batch < cfg.train.batch_size
    model = build_model(cfg.model, cfg.inference)
    optimizer = make_optimizer(model, cfg.train)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the AdamW state
    optimizer.zero_grad(set_to_none=not accumulate)
    return model, optimizer


def _update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig, micro_batch: int,
            precision: Precision, phase: Callable[[str], None] = lambda name: None) -> None:
    """One micro-batch's forward and backward, then the clip and the AdamW step: the body of
    ltm.loop.train_step (eager; `phase` marks where each part starts)."""
    phase("forward_backward")
    batch = torch.randint(0, cfg.model.vocab_size, (micro_batch, cfg.model.ctx + 1))
    with autocast_for(torch.device("cpu"), precision):
        loss, _kl = decoder_loss(model, batch, cfg.inference, list(range(micro_batch)))
    (loss * micro_batch / cfg.train.batch_size).backward()
    phase("optimizer")
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trace_peak_bytes(cfg: RunConfig, micro_batch: int, precision: Precision = "fp32") -> dict[str, int]:
    """Peak bytes held in tensors during each phase of the update (`PHASES`) of one process, traced
    on fake tensors at the config's full size and number of inner steps."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker = _LiveStorages()
    with FakeTensorMode(), tracker:
        model, optimizer = _prepare(cfg, micro_batch)
        _update(model, optimizer, cfg, micro_batch, precision, tracker.start)
    return dict(tracker.peaks)


def measure_peak_bytes(cfg: RunConfig, micro_batch: int, precision: Precision = "fp32") -> int:
    """The same update of one process run for real on this CPU: the most bytes c10's CPU allocator held
    in tensors during it, counting everything allocated since the model was built (torch.profiler's
    memory events)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    gc.collect()  # no garbage from before is freed inside the window
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model, optimizer = _prepare(cfg, micro_batch)
        with record_function("ltm.memory.update"):
            _update(model, optimizer, cfg, micro_batch, precision)
    del model, optimizer
    return _peak_in_window(prof, "ltm.memory.update")


def _peak_in_window(prof, window: str) -> int:
    """The running total of allocations less frees (of blocks allocated in the session: frees of older
    blocks are not the session's memory), its maximum within the `window` range."""
    from torch._C._profiler import _EventType

    events, ranges, stack = [], [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            events.append(event)
        elif event.name == window:
            ranges.append((event.start_time_ns, event.end_time_ns))
        stack.extend(event.children)
    if len(ranges) != 1:
        raise RuntimeError(f"expected one {window!r} range in the profile, found {len(ranges)}")
    start, end = ranges[0]
    live, peak, sizes = 0, 0, {}
    for event in sorted(events, key=lambda e: e.start_time_ns):
        fields = event.extra_fields
        if fields.alloc_size > 0:
            sizes[fields.ptr] = fields.alloc_size
            live += fields.alloc_size
        else:
            live -= sizes.pop(fields.ptr, 0)
        if start <= event.start_time_ns <= end:
            peak = max(peak, live)
    return peak


# -- the estimate ---------------------------------------------------------------------------------

_CORNERS = ((1, 1), (2, 1), (1, 2), (2, 2))
"""(micro-batch, layers) traced, at one latent per layer, for a model deeper than 2 layers."""


@dataclass(frozen=True)
class StepMemory:
    """Peak bytes per process of a training update of one RunConfig, at any micro-batch."""

    cfg: RunConfig
    precision: Precision
    local_batch: int
    """Sequences per process per update: the micro-batches that divide it are the candidates."""

    @property
    def micro_batch(self) -> int:
        """The configured micro-batch (train.micro_batch_size, 0: the whole per-process batch)."""
        return self.cfg.train.micro_batch_size or self.local_batch

    def peak_bytes(self, micro_batch: int | None = None) -> int:
        """The estimated peak at `micro_batch` sequences per forward (default: the configured one): traced
        at the full size for up to 2 layers (as cheap as the corners), interpolated from the corners beyond."""
        m = micro_batch or self.micro_batch
        model, accumulate = self.cfg.model, m < self.local_batch
        inference = dataclasses.replace(self.cfg.inference, steps=_inner_steps_shown(self.cfg.inference))
        if model.n_layers <= 2:
            return max(_traced(model, inference, self.precision, accumulate, m).values())

        def corner(m: int, layers: int, latents: int) -> dict[str, int]:
            size = {"n_layers": layers, **({"n_latents": layers * latents} if model.kind == "ltm" else {})}
            return _traced(dataclasses.replace(model, **size), inference, self.precision, accumulate, m)

        return max(round(_interpolate(corner, phase, m, model.n_layers, model.latents_per_layer)) for phase in PHASES)

    def largest_micro_batch(self, budget_bytes: float) -> int:
        """The largest micro-batch that divides the per-process batch and whose peak fits the budget; 0 if none."""
        best = 0
        for m in (d for d in range(1, self.local_batch + 1) if self.local_batch % d == 0):
            if self.peak_bytes(m) > budget_bytes:
                break  # the peak grows with the micro-batch
            best = m
        return best


def step_memory(cfg: RunConfig, device_type: Literal["cpu", "cuda"] = "cuda", processes: int = 1) -> StepMemory:
    """The memory of cfg's training update on a device type, one process of `processes`.

    cfg.model.vocab_size must be the data's (`ltm.data.planned_vocab_size`), as training takes it."""
    if cfg.train.batch_size % processes:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by the {processes} processes")
    return StepMemory(cfg, precision_on(device_type, cfg.train.precision), cfg.train.batch_size // processes)


def _inner_steps_shown(inference: InferenceConfig) -> int:
    """Inner steps that reach the loop's peak: two. A step frees the graph of the one before, but still
    holds its gradients of mu and logvar ("trajectory": its first backward allocates the decoder's .grad,
    which the later steps hold throughout); the steps after the second hold the same."""
    return min(inference.steps, 2)


@functools.lru_cache(maxsize=1024)
def _traced(model: ModelConfig, inference: InferenceConfig, precision: Precision, accumulate: bool,
            micro_batch: int) -> dict[str, int]:
    """`trace_peak_bytes` of one shape, once per process."""
    train = TrainConfig(batch_size=2 * micro_batch if accumulate else micro_batch)  # and it scales the loss
    return trace_peak_bytes(RunConfig(model=model, inference=inference, train=train), micro_batch, precision)


def _interpolate(corner, phase: str, m: int, layers: int, latents: int) -> float:
    """A phase's peak at (m, layers, latents per layer) from `corner(m, layers, latents)`'s traces: affine
    in m and in the layers (bilinear through `_CORNERS`), plus the latents' bytes, which are per
    sequence and per layer (mu, logvar, their moments and gradients, each layer's latent keys and values)."""
    value = 0.0
    for m0, l0 in _CORNERS:
        value += corner(m0, l0, 1)[phase] * (m - 1 if m0 == 2 else 2 - m) * (layers - 1 if l0 == 2 else 2 - layers)
    if latents > 1:
        per_latent = (corner(2, 2, 2)[phase] - corner(2, 2, 1)[phase]) / 4  # per sequence and layer
        value += (latents - 1) * m * layers * per_latent
    return value


def gib(n_bytes: float) -> float:
    """Bytes in GB of 2^30 bytes (the unit GPU memory is quoted in)."""
    return n_bytes / 2**30

