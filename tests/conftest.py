"""Fixtures shared by the test files."""

import pytest

from helpers import tiny_checkpoint


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A tiny random PLLaVA checkpoint folder, as a release ships it (config, safetensors, tokenizer)."""
    return tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), seed=1)
