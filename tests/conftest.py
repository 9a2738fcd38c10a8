"""Fixtures shared by the test files."""

import os

import pytest
import torch

from helpers import tiny_checkpoint
from tools import kill_started

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))   # pytest -n N
if WORKERS > 1:   # the cores shared among the workers and the tools they start, not each taking all
    THREADS = max(1, len(os.sched_getaffinity(0)) // WORKERS)
    torch.set_num_threads(THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    # and a tool that takes more threads (the toy's stages: 2, for its numbers) lets them sleep
    # while they wait instead of spinning: the other worker needs that core (docs/toy.md, "A busy
    # machine": a toy step took 135 ms spinning beside the suite, 24 ms asleep)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_collection_modifyitems(items):
    """The slow tests first, the longest of them at the very start (`@pytest.mark.slow(seconds=N)`:
    the toy's quick loop, five minutes), their files' order kept otherwise: one worker starts the
    longest work at once while the other takes the rest, and neither is left alone with it at the
    end; pytest.ini's --dist worksteal evens out the rest. (In file order the toy started three
    minutes into the suite.)"""
    def order(item):
        slow = item.get_closest_marker("slow")
        return (slow is None, -(slow.kwargs.get("seconds", 0) if slow else 0))
    items.sort(key=order)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A tiny random PLLaVA checkpoint folder, as a release ships it (config, safetensors,
    tokenizer)."""
    return tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), seed=1)


@pytest.fixture(autouse=True)
def no_orphans():
    """A test that started a tool and failed before ending it leaves no process behind (CI's
    cores)."""
    yield
    kill_started()


@pytest.fixture
def no_grad():
    """Inference only, for the files that say `pytestmark = pytest.mark.usefixtures("no_grad")`."""
    with torch.no_grad():
        yield


def tiny_model(tmp_path_factory, seed):
    """(model, tokenizer, folder) of a tiny random checkpoint saved with this seed: for a module
    fixture."""
    from model import PLLaVA
    from tokenizer import Tokenizer
    folder = tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), seed=seed)
    return PLLaVA.from_pretrained(folder), Tokenizer(folder), folder
