"""Tests of the network modules run offline: the Hugging Face hub is never asked for a tokenizer or weights."""

import sys

import pytest


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may download: a tokenizer comes from a local directory or not at all."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
