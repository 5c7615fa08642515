"""LiveTensorMemory: the CPU counterpart of the CUDA allocator peak used by the benchmarks."""

import torch
from live_memory import LiveTensorMemory


def test_counts_the_peak_and_the_end_of_tensors_allocated_in_the_block():
    with LiveTensorMemory() as memory:
        first = torch.ones(2**20)  # 4 MB
        second = torch.ones(2**19)  # 2 MB: 6 MB live at the peak
        del first
    assert memory.peak_megabytes == 6.0
    assert memory.end_megabytes == 2.0
    del second
