"""Loads Hugging Face checkpoint folders (``config.json`` + ``*.safetensors`` [+ ``tokenizer.json``])
into jaxdecode's :class:`~jaxdecode.models.Decoder`.

Supported ``model_type``s: those of :data:`jaxdecode.models._families.FAMILIES` (``llama``,
``mistral``, ``qwen2``, ``qwen3``, ``phi3``, ``gemma3_text``, ``gpt2``). Each family's config
switches and tensor-name table live there; this module only reads files.

Tensor names may carry the family's prefix (``model.``, ``transformer.``) or none (bare
base-model checkpoints, e.g. ``openai-community/gpt2``). ``Conv1D`` weights (GPT-2) are stored
``[in, out]`` and used as they are; ``nn.Linear`` weights are ``[out, in]`` and are transposed
to jaxdecode's ``[in, out]`` layout. Hugging Face checkpoints use rotate-half rotary embeddings
(``rope_layout="half"``).
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

__all__ = ["load_hf_checkpoint", "SUPPORTED_MODEL_TYPES"]

from ._families import HF_MODEL_TYPES as SUPPORTED_MODEL_TYPES  # noqa: E402


def _np_target_dtype(dtype):
    """float32 / bfloat16 (jnp or numpy types, or their names) -> a numpy dtype for conversion."""
    try:
        name = dtype.strip().lower() if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = None
    if name == "float32":
        return np.dtype(np.float32)
    if name == "bfloat16":
        return np.dtype(jnp.bfloat16)
    raise ValueError(f"dtype must be float32 or bfloat16 (or the matching jnp dtype), "
                     f"got {dtype!r}")


# --------------------------------------------------------------------------- tensor access
class _Tensors:
    """Name -> tensor access over all ``*.safetensors`` files of a folder, opened lazily with
    ``safetensors.safe_open``; every error names the file (and tensor)."""

    def __init__(self, folder: Path, strip_prefixes: tuple[str, ...], stack: ExitStack):
        from safetensors import safe_open

        self.folder = folder
        self._index = self._read_index(strip_prefixes)
        self.files = sorted(folder.glob("*.safetensors"))
        if self._index:
            # A sharded checkpoint: read the shards its index names (a folder may also hold
            # other weight files, e.g. Mistral's consolidated.safetensors).
            listed = set(self._index.values())
            missing = sorted(n for n in listed if not (folder / n).is_file())
            if missing:
                raise FileNotFoundError(f"checkpoint folder {str(folder)!r} lacks the shard(s) "
                                        f"{missing} named by its safetensors index")
            self.files = [f for f in self.files if f.name in listed]
        if not self.files:
            raise FileNotFoundError(f"no *.safetensors files in checkpoint folder {str(folder)!r}")
        self._handles = {}
        self._where: dict[str, tuple[Path, str]] = {}  # stripped name -> (file, stored name)
        for f in self.files:
            try:
                h = stack.enter_context(safe_open(str(f), framework="np"))
                keys = list(h.keys())
            except Exception as e:  # SafetensorError, OSError, ...
                raise ValueError(f"cannot read safetensors file {str(f)!r} (truncated or "
                                 f"corrupt?): {e}") from e
            self._handles[f] = h
            for k in keys:
                name = k
                for p in strip_prefixes:
                    if name.startswith(p):
                        name = name[len(p):]
                        break
                self._where.setdefault(name, (f, k))

    def _read_index(self, strip_prefixes):
        """The ``*.safetensors.index.json`` weight map (stripped name -> file), if any."""
        out = {}
        for idx in self.folder.glob("*.safetensors.index.json"):
            try:
                wm = json.loads(idx.read_text()).get("weight_map", {})
            except (OSError, ValueError):
                continue
            for k, fname in wm.items():
                for p in strip_prefixes:
                    if k.startswith(p):
                        k = k[len(p):]
                        break
                out.setdefault(k, fname)
        return out

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """The tensor ``name`` (prefix stripped), checked to have ``shape``, as ``dtype``."""
        if name not in self._where:
            if name in self._index:
                where = (f"file {str(self.folder / self._index[name])!r} (where "
                         f"model.safetensors.index.json says it is)")
            else:
                where = ", ".join(repr(f.name) for f in self.files)
                where = f"the safetensors file(s) {where} of {str(self.folder)!r}"
            raise ValueError(f"missing tensor {name!r} in {where}")
        f, stored = self._where[name]
        try:
            try:
                arr = self._handles[f].get_tensor(stored)
            except Exception:
                # Older safetensors cannot give bfloat16 as NumPy; read the bytes directly.
                arr = _read_raw_tensor(f, stored)
        except Exception as e:
            raise ValueError(f"cannot read tensor {stored!r} from safetensors file {str(f)!r} "
                             f"(truncated or corrupt?): {e}") from e
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"tensor {stored!r} in {str(f)!r} has shape {tuple(arr.shape)}, "
                             f"expected {tuple(shape)} from config.json")
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.dtype(jnp.bfloat16):
            raise ValueError(f"tensor {stored!r} in {str(f)!r} has dtype {arr.dtype}; expected a "
                             f"floating-point tensor (quantized checkpoints are not supported)")
        return np.asarray(arr).astype(dtype, copy=False)

    def stacked(self, fmt: str, n_layers: int, shape, dtype, transpose=False) -> np.ndarray:
        """``np.stack`` over layers of ``fmt.format(i)`` (each transposed if asked)."""
        out = None
        for i in range(n_layers):
            a = self.get(fmt.format(i), shape, dtype)
            if transpose:
                a = a.T
            if out is None:
                out = np.empty((n_layers,) + a.shape, dtype)
            out[i] = a
        return out


_RAW_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}


def _read_raw_tensor(path: Path, name: str) -> np.ndarray:
    """Reads one float tensor from a safetensors file by its header (8-byte little-endian header
    size, JSON header with dtype/shape/data_offsets, then the data)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        info = header[name]
        dtype = np.dtype(_RAW_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - start != count * dtype.itemsize:
            raise ValueError(f"tensor {name!r}: data size {end - start} does not match its shape")
        fh.seek(8 + n + start)
        buf = fh.read(end - start)
        if len(buf) != end - start:
            raise ValueError(f"tensor {name!r}: file ends before its data")
    return np.frombuffer(buf, dtype=dtype.newbyteorder("<")).reshape(info["shape"])


# --------------------------------------------------------------------------- config helpers
def _cfg_get(cfg: dict, folder: Path, *names, default: Any = KeyError):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    if default is KeyError:
        raise ValueError(f"config.json of {str(folder)!r} lacks {' / '.join(names)}")
    return default


def _unsupported(folder: Path, what: str):
    return ValueError(f"checkpoint {str(folder)!r}: {what} is not supported by jaxdecode")


# --------------------------------------------------------------------------- families
def _token_ids(v) -> tuple:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),)


def _hf_config(folder: Path, cfg: dict, family) -> "DecoderConfig":
    """config.json -> DecoderConfig: the shape keys every family shares (under either naming
    scheme), then the family's own switches."""
    from ._families import _layer_types, _plain_rope, finish_config

    get = lambda *names, default=KeyError: _cfg_get(cfg, folder, *names, default=default)  # noqa: E731
    n_heads = int(get("num_attention_heads", "n_head"))
    dim = int(get("hidden_size", "n_embd"))
    n_layers = int(get("num_hidden_layers", "n_layer"))
    bos = _token_ids(cfg.get("bos_token_id"))
    kw = dict(
        vocab_size=int(get("vocab_size")), dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=int(get("num_key_value_heads", default=n_heads)),
        head_dim=int(get("head_dim", default=dim // n_heads)),
        hidden_dim=int(get("intermediate_size", "n_inner", default=0) or 0) or None,
        norm_eps=float(get("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", default=1e-6)),
        max_seq_len=int(get("max_position_embeddings", "n_positions", "n_ctx", default=2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", family.switches.get("tie_embeddings", False))),
        bos_id=bos[0] if bos else None, eos_ids=_token_ids(cfg.get("eos_token_id")),
        layer_types=_layer_types(cfg, n_layers),
    )
    try:
        if family.switches.get("positions") != "learned":
            rope = _plain_rope(cfg, family.name)
            kw["rope_theta"], kw["rope_factor"] = rope["rope_theta"], rope.get("rope_factor")
        kw.update(family.hf_config(cfg))
    except (ValueError, KeyError) as e:
        raise _unsupported(folder, str(e).strip("'")) from e
    if kw["layer_types"] is not None and "sliding" in kw["layer_types"] and not kw.get("sliding_window"):
        kw["sliding_window"] = cfg.get("sliding_window")
    if kw["layer_types"] is not None and not kw.get("sliding_window"):
        kw["layer_types"] = None  # all full
    if family.name == "gpt2" and kw["hidden_dim"] is None:
        kw["hidden_dim"] = 4 * dim
    return finish_config(family, kw)


def _load_family(folder: Path, cfg: dict, family, dtype, stack: ExitStack):
    """Reads every parameter the config needs through the family's name table."""
    from ._decoder import Decoder, param_shapes

    dc = _hf_config(folder, cfg, family)
    t = _Tensors(folder, family.hf_prefix, stack)
    shapes = param_shapes(dc)

    def read(key, shape, i=None):  # one tensor, in jaxdecode's [in, out] layout
        name, kind = family.hf_names[key]
        stored = tuple(shape[::-1]) if kind == "linear" else tuple(shape)
        a = t.get(name if i is None else name.format(i=i), stored, dtype)
        return np.ascontiguousarray(a.T) if kind == "linear" else a

    params: dict = {key: read(key, shape) for key, shape in shapes.items() if key != "layers"}
    layers = {}
    for key, shape in shapes["layers"].items():
        layers[key] = np.empty(shape, dtype)
        for i in range(dc.n_layers):
            layers[key][i] = read(key, shape[1:], i)
    params["layers"] = layers
    return Decoder.from_params(params, dc)


# --------------------------------------------------------------------------- entry point
def load_hf_checkpoint(path, *, dtype=jnp.float32, load_tokenizer: bool = True):
    """Loads a Hugging Face checkpoint folder.

    Args:
      path: a folder holding ``config.json`` and one or more ``*.safetensors`` files (sharded
        checkpoints are read from all of them), optionally ``tokenizer.json``.
      dtype: ``jnp.float32`` or ``jnp.bfloat16`` (or their names): the dtype of the weights.
      load_tokenizer: read ``tokenizer.json`` when present.

    Returns:
      ``(model, tokenizer)``: a :class:`~jaxdecode.models.Decoder`, and a
      ``jaxdecode.models._tokenizer.Tokenizer`` (``None`` when the folder has no tokenizer.json
      or ``load_tokenizer`` is false).

    Raises:
      FileNotFoundError: the folder, its config.json or its safetensors files are missing.
      ValueError: an unsupported model_type or architecture option, a truncated/corrupt
        safetensors file (named), a missing tensor (named, with the file(s) searched), or a
        tensor whose shape disagrees with config.json.
    """
    folder = Path(os.fspath(path)).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint folder {str(folder)!r} does not exist "
                                f"(or is not a folder)")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot parse {str(cfg_path)!r}: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(cfg_path)!r} does not hold a JSON object")
    from ._families import family_for_hf

    model_type = cfg.get("model_type")
    family = family_for_hf(model_type)
    if family is None:
        raise ValueError(f"checkpoint folder {str(folder)!r} has model_type {model_type!r}, which "
                         f"jaxdecode cannot load; supported model types: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    np_dtype = _np_target_dtype(dtype)
    with ExitStack() as stack:
        model = _load_family(folder, cfg, family, np_dtype, stack)

    tokenizer = None
    tok_path = folder / "tokenizer.json"
    if load_tokenizer and tok_path.is_file():
        from ._tokenizer import Tokenizer  # lazy: the tokenizers package is optional

        tokenizer = Tokenizer.from_file(str(tok_path))
    return model, tokenizer
