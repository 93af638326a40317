"""The machine a calibration was made on: GPU and host memory, and the bandwidths the scheduler
plans with (HBM, PCIe and CPU attention, each alone and the host pair concurrently), measured by
`scheduler.cost_model.measure` (each field labelled measured or defaulted) and saved where the
runtime finds them (`cost_model.cache_path`)."""

from __future__ import annotations

import os
import platform

import psutil

from ..scheduler import cost_model


def gpu_facts() -> list[dict]:
    """Name and memory of each NVIDIA GPU through NVML ([] where there is none)."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:                                   # no driver, no library: no GPU facts
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                        "memory_total_gib": mem.total / 2 ** 30,
                        "memory_free_gib": mem.free / 2 ** 30})
        return out
    finally:
        pynvml.nvmlShutdown()


def host_facts() -> dict:
    vm = psutil.virtual_memory()
    return {"cpus": os.cpu_count(), "machine": platform.machine(),
            "memory_total_gib": vm.total / 2 ** 30, "memory_available_gib": vm.available / 2 ** 30}


def measure_machine(bandwidths: bool = True) -> dict:
    """GPU and host facts, and (unless `bandwidths` is False) the costs, with which fields were
    measured and which defaulted ("measured", "defaulted"), also written to the runtime's cost
    cache so `HybridAttention` plans with them (`cost_model.save_to_cache`: only a complete
    measurement; "costs_saved_to" says where, or why not)."""
    out = {"gpus": gpu_facts(), "host": host_facts()}
    if bandwidths:
        costs = cost_model.measure(quick=True)
        try:
            out["costs_saved_to"] = str(cost_model.save_to_cache(costs))
        except (ValueError, OSError) as exc:
            out["costs_saved_to"] = f"not saved: {exc}"
        out["costs"] = costs.to_dict()
    return out
