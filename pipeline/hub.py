"""The Hugging Face hub, where pretrained encoders and shared models come from.

Where the hub answers, huggingface_hub downloads (or revalidates its cache); where it does not, it would
retry for half a minute before falling back to its cache. tessera asks the hub's host once, for a few
seconds, and otherwise reads the cache alone (``HF_HOME``), so that an offline machine gets its answer,
the cached files or a one-line error, at once.
"""

from __future__ import annotations

import contextlib
import socket
import urllib.parse
from collections.abc import Iterator

PROBE_TIMEOUT = 3.0  # seconds for the hub to answer before it is taken as unreachable


def reachable() -> bool:
    """Whether huggingface_hub may use the network: not in offline mode (HF_HUB_OFFLINE), and the hub's
    host accepts a connection within PROBE_TIMEOUT (DNS failing counts as no)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    parts = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((parts.hostname or "huggingface.co", parts.port or 443), timeout=PROBE_TIMEOUT).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def cache_only(offline: bool = True) -> Iterator[None]:
    """huggingface_hub reads its cache only, for the duration (when `offline`), for libraries that call it
    without a `local_files_only` argument (smp's and timm's weight loaders)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
