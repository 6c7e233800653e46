"""Reachability of the Hugging Face hub, checked once so offline users fail fast.

Without this check, huggingface_hub retries for ~25 s before giving up on a machine with
no network; with it, an offline run goes straight to the local cache and, if the files are
not there, to a clear error.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def offline_kwargs() -> dict:
    """Extra from_pretrained/load_dataset arguments: local files only when offline."""
    return {} if hub_reachable() else {"local_files_only": True}


def go_offline_unless_reachable() -> None:
    """Switch huggingface_hub and datasets to cache-only mode when the hub is unreachable.

    Both libraries read their offline flag at import time, so setting the environment
    variable is not enough once they are imported; we flip the module constants too.
    """
    if hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets.config
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
