"""Shared fixtures for the data tests: one trained project tokenizer per session."""
import pytest

from kimi_vl_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope='session')
def tok():
  return tokenizer_lib.train_sentencepiece(vocab_size=4096, seed=0)
