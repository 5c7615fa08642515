"""trainer.return_freed_memory: freed tensors leave the process RSS (glibc Linux)."""

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import os, sys
    import torch
    from scpeft_cli.training.host_memory import return_freed_memory

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    if sys.argv[1] == "on":
        assert return_freed_memory()
    torch.ones(2**21).sum()  # freed at once: glibc raises its dynamic mmap threshold above a freed mmapped block's size
    before = rss_mb()
    blocks = [torch.ones(2**21) for _ in range(40)]  # 40 activation-sized blocks of 8 MB
    del blocks[:-1]  # the backward pass frees all but the newest
    print(rss_mb() - before)
    """
)


def retained_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_blocks_leave_the_rss():
    # 320 MB allocated, all but 8 MB freed: glibc's heap keeps the freed blocks resident by default
    assert retained_mb("off") > 200
    assert retained_mb("on") < 24
