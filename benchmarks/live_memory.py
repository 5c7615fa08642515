"""Live-tensor memory of a block of work on CPU, for the benchmarks and tests (not part of the package).

Imported as `live_memory`: the scripts run as `python benchmarks/NAME.py`, and pytest puts this folder on
`sys.path` (`pythonpath` in pyproject.toml).
"""

from __future__ import annotations

import torch


class LiveTensorMemory:
    """Context manager: peak and final bytes of live CPU tensors during a block, over those at its start.

    The CPU counterpart of `torch.cuda.max_memory_allocated`: it counts what tensors hold, not what the
    C allocator keeps mapped after they are freed (the process RSS counts both). Read from the profiler's
    allocation events, so the block runs slower: for measurements, not for training.
    """

    def __enter__(self) -> LiveTensorMemory:
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profiler.__exit__(*exc)
        changes = sorted(
            (event.start_ns(), event.nbytes())
            for event in self._profiler.profiler.kineto_results.events()
            if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
        )
        running = peak = 0
        for _, nbytes in changes:
            running += nbytes
            peak = max(peak, running)
        self.peak_megabytes = peak / 2**20
        self.end_megabytes = running / 2**20
