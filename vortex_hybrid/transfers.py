"""`to_device`: a host tensor onto a device without synchronising the stream.

torch's blocking host-to-device copy (`t.to("cuda")`) waits for the current stream to drain
(`memcpy_and_sync`), so a `plan()` made while the GPU runs the step before would wait for that
step at each of its copies. Going through pinned memory, non-blocking, the copy is queued behind
the running work instead and the host goes on; torch's pinned allocator keeps the staging block
until the copy has run.
"""

from __future__ import annotations

from typing import Union

import torch


def to_device(t: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """`t` on `device`: a CPU tensor bound for CUDA through a pinned copy, non-blocking (the
    caller may change `t` afterwards); anything else as `t.to(device)`."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
