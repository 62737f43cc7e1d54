"""MLflow's system metrics for a training run (system/*: CPU, memory, disk, network, GPUs), with the
GPUs limited to those this process was given.

MLflow's GPU monitor reports every GPU that NVML enumerates, which on a shared node (a SLURM job or a
Ray trial given one GPU of eight) includes other jobs' GPUs. Here its list is cut to the GPUs that
CUDA_VISIBLE_DEVICES names, in CUDA's order, so system/gpu_0_* is this process's cuda:0 whichever
physical GPU that is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

_log = logging.getLogger(__name__)


def visible_nvml_indices(visible: str | None, nvml_uuids: Sequence[str]) -> list[int]:
    """The NVML indices of the GPUs that CUDA_VISIBLE_DEVICES=`visible` gives this process, in CUDA's order.

    `nvml_uuids` are the UUIDs of NVML's GPUs by index ("GPU-8f2c..."); None means every GPU. Entries
    are indices or UUIDs (or a unique prefix of one, "GPU-8f2c"); as CUDA does, the list ends at the
    first entry that names no GPU (or one already named), so "" and "-1" give none. A MIG instance
    ("MIG-...") names no GPU here: NVML's figures would be the whole GPU's, not the instance's. An
    index is NVML's, which is CUDA's order where all GPUs are alike or CUDA_DEVICE_ORDER=PCI_BUS_ID.
    """
    if visible is None:
        return list(range(len(nvml_uuids)))
    found: list[int] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit():
            index = int(entry) if int(entry) < len(nvml_uuids) else None
        else:
            matches = [i for i, uuid in enumerate(nvml_uuids) if entry.startswith("GPU-") and uuid.startswith(entry)]
            index = matches[0] if len(matches) == 1 else None
        if index is None or index in found:
            break
        found.append(index)
    return found


def system_metrics_monitor(run_id: str, tracking_uri: str, resumed: bool):
    """MLflow's sampler of system metrics for the run (not started), its GPU part cut to this process's
    GPUs; None without psutil."""
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        return None
    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=resumed, tracking_uri=tracking_uri)
    for gpus in [m for m in monitor.monitors if isinstance(m, GPUMonitor)]:
        try:
            import pynvml  # GPUMonitor exists only where nvidia-ml-py and a driver do

            uuids = [_text(pynvml.nvmlDeviceGetUUID(handle)) for handle in gpus.gpu_handles]
        except Exception as err:  # better no GPU metrics than other jobs' GPUs
            _log.warning("no GPU system metrics: cannot tell which GPUs are this process's (%s)", err)
            monitor.monitors.remove(gpus)
            continue
        gpus.gpu_handles = [gpus.gpu_handles[i]
                            for i in visible_nvml_indices(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids)]
        gpus.num_gpus = len(gpus.gpu_handles)
    return monitor


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older pynvml returns bytes
