"""Fixtures of the command-line tests: a tiny seeded Llama with a character-level tokenizer and a random adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msplora_dist import MSPLoRAConfig, apply_msplora, get_hierarchy, save_adapter
from tests.cli.test_generate import load, save_base


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(base dir, adapter dir)."""
    root = tmp_path_factory.mktemp("generate")
    base = save_base(root / "base")
    model = apply_msplora(load(base), MSPLoRAConfig(ranks=(4, 2, 1), num_mid_groups=2, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(get_hierarchy(model).named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(model, root / "adapter")
    return base, root / "adapter"


@pytest.fixture
def quiet_transformers():
    """What the script's environment settings do in a fresh process, for in-process runs of main()."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    yield
    logging.set_verbosity(verbosity)
    if bars:
        logging.enable_progress_bar()
