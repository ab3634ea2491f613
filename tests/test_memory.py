"""Peak memory over a process tree (PSS) and handing freed heap back to the OS."""

from __future__ import annotations

import subprocess
import sys

from pipeline.memory import PeakMemory


def test_peak_counts_descendants_and_shares_pages() -> None:
    """A child holding 300 MB raises the peak by about that much; torch-free, so the base is small."""
    # 4 s: the sampler waits 10x as long as a sample takes, and in a busy suite (an embedded Ray
    # among this process's children) a sample can take a few hundred milliseconds.
    code = "import numpy as np, time; a = np.ones(300 * 2**20, np.uint8); time.sleep(4)"
    with PeakMemory(interval=0.05) as idle:
        pass
    with PeakMemory(interval=0.05) as busy:
        subprocess.run([sys.executable, "-c", code], check=True)
    assert 250 <= busy.peak_mib - idle.peak_mib <= 450


def test_release_memory_gives_freed_heap_back() -> None:
    """Holes left in glibc's heap by freed mid-sized arrays are returned to the OS (Linux, glibc)."""
    code = """
import numpy as np, psutil
from pipeline.memory import release_memory
chunks = [np.ones(64 * 1024, np.uint8) for _ in range(2000)]  # 128 MB of heap-sized arrays
del chunks[::2]  # 64 MB of holes between live arrays: the heap cannot shrink from its top
before = psutil.Process().memory_info().rss
release_memory()
print((before - psutil.Process().memory_info().rss) / 2**20)
"""
    freed = float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert freed >= 40
