"""Peak memory over a process tree (PSS) and handing freed heap back to the OS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_peak_counts_descendants_and_shares_pages() -> None:
    """A child holding 300 MB raises the peak by about that much; torch-free, so the base is small."""
    # Measured in a fresh process, whose only descendant is that child: this pytest worker's tree also
    # holds the suite's embedded Ray, whose workers come and go. 4 s: the sampler waits 10x as long as
    # a sample takes, and on a busy machine a sample can take a few hundred milliseconds.
    child = "import numpy as np, time; a = np.ones(300 * 2**20, np.uint8); time.sleep(4)"
    code = f"""
import subprocess, sys
from pipeline.memory import PeakMemory
with PeakMemory(interval=0.05) as idle:
    pass
with PeakMemory(interval=0.05) as busy:
    subprocess.run([sys.executable, "-c", {child!r}], check=True)
print(busy.peak_mib - idle.peak_mib)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert 250 <= float(out.stdout) <= 450


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
