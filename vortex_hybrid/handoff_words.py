"""The words of the CPU-GPU hand-off: the layout of its pinned flag rows and its codes.

Shared by the three places that read or write them: the Triton kernels the GPU runs
(`gpu_kernels/handoff_flags.py`), the compiled Numba poller of the CPU worker
(`cpu_kernels/handoff_flags.py`) and the protocol driver (`runtime/handoff.py`, which documents the
protocol itself).

Flags are one flat int64 array of `(channels + 1) * ROW` words in pinned, device-mapped host memory:
one row per channel, then a control row. A channel row spans two 64-byte lines, so the words the GPU
writes and the words the CPU writes never share a cache line:

    word          written by        meaning
    REQUEST       GPU (publish)     last sequence number published: its inputs are in pinned buffers
    DONE          CPU worker        last sequence number answered: its outputs are in pinned buffers
    ERROR         CPU worker / GPU  nonzero: this channel's step failed (ERR_CPU or ERR_TIMEOUT)
    SKIP_THROUGH  driver            sequence numbers up to this one belong to an abandoned step
    SERVED        CPU worker        last sequence number the worker took (answered or failed)

and in the control row, STOP (driver: the worker returns). Beside the rows, a second pinned int64
array of NEED words, [channels, num_layers]: the GPU's publish writes there, before REQUEST, how
many items the layer's CPU part has (-1: not given); 0 tells the worker to answer without calling
it. Sequence numbers are
`step * num_layers + layer + 1`: they grow across steps and 0 means "none yet".
"""

ROW = 16
"""int64 words per channel row (two 64-byte lines)."""
REQUEST = 0
DONE = 8
ERROR = 9
SKIP_THROUGH = 10
SERVED = 11
STOP = 0
"""Word of the control row (the row after the last channel)."""

ERR_CPU = 1
"""ERROR value: the CPU part of a layer raised."""
ERR_TIMEOUT = 2
"""ERROR value: a GPU wait ran out of time."""

ANSWERED = 0
"""Status of a wait: the worker answered."""
CPU_FAILED = 1
"""Status of a wait: the CPU part raised (this layer's or an earlier layer's of the step)."""
TIMED_OUT = 2
"""Status of a wait: no answer within the bound."""
ABANDONED = 3
"""Status of a wait: an earlier wait of the step timed out, so this one did not wait."""
STATUS_NAMES = {ANSWERED: "answered", CPU_FAILED: "CPU part failed", TIMED_OUT: "timed out",
                ABANDONED: "abandoned after an earlier timeout"}
