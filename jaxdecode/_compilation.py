"""Fewer compilations: shape buckets for the decoders and JAX's persistent compilation cache.

Every new prompt length or ``max_new_tokens`` is a new shape, and a new shape is a new XLA
compilation (seconds to tens of seconds for a real model on CPU). The decoders therefore pad
the shapes a user does not choose to a few buckets and slice the results back, and
:func:`enable_compilation_cache` keeps compiled programs on disk across processes.
"""

from __future__ import annotations

import os
import sys

__all__ = ["bucket", "enable_compilation_cache", "default_cache_dir"]


def bucket(n: int, smallest: int, ratio: int) -> int:
    """The smallest of ``smallest * ratio**k`` (k >= 0) that is >= ``n``."""
    b = smallest
    while b < n:
        b *= ratio
    return b


def default_cache_dir() -> str:
    """``$JAXDECODE_CACHE_DIR``, else ``~/.cache/jaxdecode/xla``."""
    return os.environ.get("JAXDECODE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxdecode", "xla")


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache, so a later process skips compilation.

    Every compiled program (whatever its compile time or size) is written to ``path``; a new
    Python process that runs the same shapes loads it instead of compiling again. Call it once,
    before the first ``generate``. The ``jaxdecode`` command calls it for you.

    Args:
      path: the cache folder (created if missing). Default: ``$JAXDECODE_CACHE_DIR`` or
        ``~/.cache/jaxdecode/xla``.

    Returns:
      The folder in use, or None when it could not be set up (e.g. a read-only home); a warning
      is printed to stderr then, and decoding works as before, without the cache.
    """
    import jax

    folder = os.fspath(path) if path is not None else default_cache_dir()
    try:
        os.makedirs(folder, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except Exception as e:  # a read-only home must not stop generation
        print(f"jaxdecode: persistent compilation cache disabled ({e})", file=sys.stderr)
        return None
    return folder
