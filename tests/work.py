"""Functions that the tests' decode workers run (a module light to import: it is imported in each
worker)."""

import os
import time

from plumbing import workers
from plumbing.workers import decode_workers  # noqa: F401  (the tests' name for it)


def worker_env(name):
    """What a decode worker sees of an environment variable."""
    return os.environ.get(name)


def beating(seconds):
    """A decode that takes `seconds` and says it is moving every 0.1 s (as shot detection does)."""
    for _ in range(int(seconds * 10)):
        workers.heartbeat()
        time.sleep(0.1)
    return seconds


def silent(seconds):
    """A decode that takes `seconds` and says nothing (a stalled decoder)."""
    time.sleep(seconds)
    return seconds
