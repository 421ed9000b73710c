"""Memory accounting: peak and current memory of this process (CUDA allocator on GPU, resident set
size on CPU), and the exact bytes of parameters, gradients and optimizer state."""

import resource

import torch

from mofasgd import MoFaSGD, state_bytes
from mofasgd.optimizer import local_part

# the peak-memory fields of metrics.jsonl records: training steps, and validation apart
PEAK_KEYS = ("peak_mem_bytes", "peak_reserved_bytes", "activation_peak_bytes", "val_peak_mem_bytes",
             "val_peak_reserved_bytes")
# memory_parts' fields, logged with every training step and in summary.json
MEMORY_KEYS = ("param_bytes", "grad_bytes", "opt_state_bytes_hidden", "opt_state_bytes_other")


def reset_peak_memory(device) -> None:
    """Starts a new peak-memory window: the CUDA allocator's peak, or on Linux the process's peak
    resident set size (VmHWM, reset by writing 5 to /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the peak then runs from the process start
        pass


def _proc_status_bytes(field: str) -> int | None:
    """A size field of /proc/self/status (VmRSS, VmHWM), in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def peak_memory_bytes(device) -> int:
    """Peak since the last reset_peak_memory: CUDA allocator peak (allocated tensors) on GPU,
    peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_memory_bytes(device) -> int:
    """Memory held now: allocated CUDA tensors on GPU, the resident set size on CPU (0 if unknown)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS") or 0


def peak_memory_record(device, prefix: str = "") -> dict:
    """The peak-memory fields of a metrics record: `peak_mem_bytes` (training steps) or
    `val_peak_mem_bytes` (validation), plus the allocator's reserved peak on GPU."""
    record = {f"{prefix}peak_mem_bytes": peak_memory_bytes(device)}
    if device.type == "cuda":
        record[f"{prefix}peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return record


def memory_parts(model, hidden_opt, adam_opt) -> dict:
    """Exact bytes of parameters, gradients and optimizer state (hidden matrices vs the rest) held
    by this rank: under FSDP2 its shards."""
    params = list({id(p): p for p in model.parameters()}.values())
    # gradients still held, plus the pending sketches that stand in for them in sketch mode
    sketches = hidden_opt.sketch_bytes() if isinstance(hidden_opt, MoFaSGD) else 0
    return {
        "param_bytes": sum(local_part(p).numel() * p.element_size() for p in params),
        "grad_bytes": sum(local_part(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None)
                      + sketches,
        "opt_state_bytes_hidden": state_bytes(hidden_opt),
        "opt_state_bytes_other": state_bytes(adam_opt),
    }
