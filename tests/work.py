"""Functions that the tests' decode workers run (a module light to import: it is imported in each worker)."""

import os
import time

import data


def worker_env(name):
    """What a decode worker sees of an environment variable."""
    return os.environ.get(name)


def beating(seconds):
    """A decode that takes `seconds` and says it is moving every 0.1 s (as shot detection does)."""
    for _ in range(int(seconds * 10)):
        data.heartbeat()
        time.sleep(0.1)
    return seconds


def silent(seconds):
    """A decode that takes `seconds` and says nothing (a stalled decoder)."""
    time.sleep(seconds)
    return seconds


def decode_workers(parent):
    """The pids of the decode workers a process started (their command line names workers._serve)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"workers._serve" in cmd:
            found.append(int(pid))
    return found
