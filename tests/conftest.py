"""Shared fixtures for the sampling / processor / seed tests (kept deliberately small)."""

import numpy as np
import pytest

# The toy vocabulary and next-token logits of the book's chapter 5 ("every effort moves you").
TOY_VOCAB = ("closer", "every", "effort", "forward", "inches", "moves", "pizza", "toward", "you")
TOY_LOGITS = (4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79)


@pytest.fixture
def np_rng():
    """A fresh, fixed-seed NumPy generator per test."""
    return np.random.default_rng(20240611)


@pytest.fixture
def toy_vocab():
    return {word: i for i, word in enumerate(TOY_VOCAB)}


@pytest.fixture
def toy_logits():
    return np.array(TOY_LOGITS, np.float32)
