"""Shared fixtures for the sampling / processor / seed tests (kept deliberately small)."""

import os
import pathlib

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


_CACHE_FLAGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(autouse=True)
def _no_persistent_compilation_cache():
    """Every test ends with JAX's persistent compilation cache as the session began (off): a
    test that turns it on (the CLI does) must not make the rest of the session write every
    compiled program to disk (a run of the suite crashed inside such a write)."""
    import jax
    from jax._src import compilation_cache

    saved = {name: getattr(jax.config, name) for name in _CACHE_FLAGS}
    yield
    if any(getattr(jax.config, name) != value for name, value in saved.items()):
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def _mapped_regions() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop JAX's compiled programs when the process holds many memory
    mappings: every XLA:CPU executable maps its own code pages, and a whole-suite process that
    kept them all came near Linux's vm.max_map_count (65,530), where the next compile
    segfaulted inside XLA. Clearing costs only recompiles in later modules."""
    yield
    if _mapped_regions() > 15000:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()


def private_cache_dir(tmp_path) -> str:
    """A fresh ``JAXDECODE_CACHE_DIR`` for a ``jaxdecode`` subprocess (its own persistent XLA
    cache) whose ``kernels/`` is this session's: the CPU kernel is built once per source, and
    without the link every such subprocess would spend 3-5 s compiling it again with g++."""
    from jaxdecode.models import _cpu_kernel

    root = pathlib.Path(tmp_path) / "xla"
    root.mkdir(parents=True, exist_ok=True)
    if _cpu_kernel.available() and not (root / "kernels").exists():
        os.symlink(_SESSION_KERNELS, root / "kernels", target_is_directory=True)
    return str(root)


def _session_kernels() -> pathlib.Path:
    from jaxdecode.models import _cpu_kernel

    _cpu_kernel.available()  # built (or found) here, before a test points JAXDECODE_CACHE_DIR elsewhere
    return _cpu_kernel._cache_dir()


_SESSION_KERNELS = _session_kernels()
