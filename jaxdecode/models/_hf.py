"""Loads Hugging Face checkpoint folders (``config.json`` + ``*.safetensors`` [+ ``tokenizer.json``])
into jaxdecode's GPT-2 and Llama models.

Supported ``model_type``s: ``"gpt2"`` (``GPT2LMHeadModel`` / ``GPT2Model`` checkpoints) and
``"llama"`` (``LlamaForCausalLM`` / ``LlamaModel``).

Tensor names may carry the ``transformer.`` (GPT-2) or ``model.`` (Llama) prefix or none (the bare
base-model checkpoints, e.g. ``openai-community/gpt2``). GPT-2's ``Conv1D`` weights are stored
``[in, out]`` and are used as they are; ``nn.Linear`` weights (Llama, and GPT-2's untied
``lm_head``) are ``[out, in]`` and are transposed to jaxdecode's ``[in, out]`` layout. Hugging Face
Llama checkpoints use rotate-half rotary embeddings, so the Llama config gets
``rope_layout="half"``.
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

SUPPORTED_MODEL_TYPES = ("gpt2", "llama")


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


# --------------------------------------------------------------------------- GPT-2
_GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _load_gpt2(folder: Path, cfg: dict, dtype, stack: ExitStack):
    from ._gpt2 import GPT2, GPT2Config

    act = cfg.get("activation_function", "gelu_new")
    if act in _GPT2_TANH_GELUS:
        activation = "gelu_tanh"
    elif act == "gelu":
        activation = "gelu"
    else:
        raise _unsupported(folder, f"GPT-2 activation_function {act!r}")
    if not cfg.get("scale_attn_weights", True):
        raise _unsupported(folder, "scale_attn_weights=false")
    if cfg.get("scale_attn_by_inverse_layer_idx", False):
        raise _unsupported(folder, "scale_attn_by_inverse_layer_idx=true")
    if cfg.get("add_cross_attention", False):
        raise _unsupported(folder, "add_cross_attention=true")

    gc = GPT2Config(
        vocab_size=int(_cfg_get(cfg, folder, "vocab_size")),
        max_seq_len=int(_cfg_get(cfg, folder, "n_positions", "n_ctx", "max_position_embeddings")),
        dim=int(_cfg_get(cfg, folder, "n_embd", "hidden_size")),
        n_layers=int(_cfg_get(cfg, folder, "n_layer", "num_hidden_layers")),
        n_heads=int(_cfg_get(cfg, folder, "n_head", "num_attention_heads")),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        mlp_dim=cfg.get("n_inner"),
        activation=activation,
    )
    t = _Tensors(folder, ("transformer.",), stack)
    L, D, F, V, P = gc.n_layers, gc.dim, gc.ffn_dim, gc.vocab_size, gc.max_seq_len
    h = "h.{}."
    layers = {
        "ln1_scale": t.stacked(h + "ln_1.weight", L, (D,), dtype),
        "ln1_bias": t.stacked(h + "ln_1.bias", L, (D,), dtype),
        "w_qkv": t.stacked(h + "attn.c_attn.weight", L, (D, 3 * D), dtype),
        "b_qkv": t.stacked(h + "attn.c_attn.bias", L, (3 * D,), dtype),
        "w_o": t.stacked(h + "attn.c_proj.weight", L, (D, D), dtype),
        "b_o": t.stacked(h + "attn.c_proj.bias", L, (D,), dtype),
        "ln2_scale": t.stacked(h + "ln_2.weight", L, (D,), dtype),
        "ln2_bias": t.stacked(h + "ln_2.bias", L, (D,), dtype),
        "w_fc": t.stacked(h + "mlp.c_fc.weight", L, (D, F), dtype),
        "b_fc": t.stacked(h + "mlp.c_fc.bias", L, (F,), dtype),
        "w_proj": t.stacked(h + "mlp.c_proj.weight", L, (F, D), dtype),
        "b_proj": t.stacked(h + "mlp.c_proj.bias", L, (D,), dtype),
    }
    params = {
        "wte": t.get("wte.weight", (V, D), dtype),
        "wpe": t.get("wpe.weight", (P, D), dtype),
        "layers": layers,
        "ln_f_scale": t.get("ln_f.weight", (D,), dtype),
        "ln_f_bias": t.get("ln_f.bias", (D,), dtype),
    }
    if not gc.tie_embeddings:
        params["lm_head"] = t.get("lm_head.weight", (V, D), dtype).T  # nn.Linear: [out, in]
    return GPT2.from_params(params, gc)


# --------------------------------------------------------------------------- Llama
def _llama_rope_theta(cfg: dict, folder: Path) -> float:
    rp = cfg.get("rope_parameters") or {}  # transformers >= 5
    rs = cfg.get("rope_scaling") or {}  # transformers 4.x
    if isinstance(rp, dict) and rp and not ("rope_type" in rp or "rope_theta" in rp):
        rp = {}  # per-layer-type dict (not used by Llama)
    rope_type = rp.get("rope_type", rp.get("type")) or rs.get("rope_type", rs.get("type")) \
        or "default"
    if rope_type != "default":
        raise _unsupported(folder, f"rope scaling type {rope_type!r} (only plain RoPE)")
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


def _token_ids(v) -> tuple:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),)


def _load_llama(folder: Path, cfg: dict, dtype, stack: ExitStack):
    from ._llama import Llama, LlamaConfig

    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _unsupported(folder, f"Llama hidden_act {act!r} (only silu)")
    if cfg.get("attention_bias", False):
        raise _unsupported(folder, "attention_bias=true")
    if cfg.get("mlp_bias", False):
        raise _unsupported(folder, "mlp_bias=true")

    n_heads = int(_cfg_get(cfg, folder, "num_attention_heads"))
    dim = int(_cfg_get(cfg, folder, "hidden_size"))
    bos = _token_ids(cfg.get("bos_token_id"))
    lc = LlamaConfig(
        vocab_size=int(_cfg_get(cfg, folder, "vocab_size")),
        dim=dim,
        n_layers=int(_cfg_get(cfg, folder, "num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(_cfg_get(cfg, folder, "num_key_value_heads", default=n_heads)),
        head_dim=int(_cfg_get(cfg, folder, "head_dim", default=dim // n_heads)),
        hidden_dim=int(_cfg_get(cfg, folder, "intermediate_size")),
        norm_eps=float(_cfg_get(cfg, folder, "rms_norm_eps", default=1e-6)),
        rope_theta=_llama_rope_theta(cfg, folder),
        rope_layout="half",
        max_seq_len=int(_cfg_get(cfg, folder, "max_position_embeddings", default=2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_id=bos[0] if bos else None,
        eos_ids=_token_ids(cfg.get("eos_token_id")),
    )
    t = _Tensors(folder, ("model.",), stack)
    L, D, V, F = lc.n_layers, lc.dim, lc.vocab_size, lc.hidden_dim
    Hd, KVd = lc.n_heads * lc.head_dim, lc.n_kv_heads * lc.head_dim
    p = "layers.{}."

    def lin(fmt, out_dim, in_dim):  # nn.Linear [out, in] -> [L, in, out]
        return t.stacked(p + fmt, L, (out_dim, in_dim), dtype, transpose=True)

    layers = {
        "attn_norm": t.stacked(p + "input_layernorm.weight", L, (D,), dtype),
        "wq": lin("self_attn.q_proj.weight", Hd, D),
        "wk": lin("self_attn.k_proj.weight", KVd, D),
        "wv": lin("self_attn.v_proj.weight", KVd, D),
        "wo": lin("self_attn.o_proj.weight", D, Hd),
        "mlp_norm": t.stacked(p + "post_attention_layernorm.weight", L, (D,), dtype),
        "w_gate": lin("mlp.gate_proj.weight", F, D),
        "w_up": lin("mlp.up_proj.weight", F, D),
        "w_down": lin("mlp.down_proj.weight", D, F),
    }
    params = {
        "embed": t.get("embed_tokens.weight", (V, D), dtype),
        "layers": layers,
        "norm": t.get("norm.weight", (D,), dtype),
    }
    if not lc.tie_embeddings:
        params["lm_head"] = np.ascontiguousarray(t.get("lm_head.weight", (V, D), dtype).T)
    return Llama.from_params(params, lc)


_LOADERS: dict[str, Callable] = {"gpt2": _load_gpt2, "llama": _load_llama}


# --------------------------------------------------------------------------- entry point
def load_hf_checkpoint(path, *, dtype=jnp.float32, load_tokenizer: bool = True):
    """Loads a Hugging Face checkpoint folder.

    Args:
      path: a folder holding ``config.json`` and one or more ``*.safetensors`` files (sharded
        checkpoints are read from all of them), optionally ``tokenizer.json``.
      dtype: ``jnp.float32`` or ``jnp.bfloat16`` (or their names): the dtype of the weights.
      load_tokenizer: read ``tokenizer.json`` when present.

    Returns:
      ``(model, tokenizer)``: a ``GPT2`` or ``Llama`` model, and a
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
    model_type = cfg.get("model_type")
    if model_type not in _LOADERS:
        raise ValueError(f"checkpoint folder {str(folder)!r} has model_type {model_type!r}, which "
                         f"jaxdecode cannot load; supported model types: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    np_dtype = _np_target_dtype(dtype)
    with ExitStack() as stack:
        model = _LOADERS[model_type](folder, cfg, np_dtype, stack)

    tokenizer = None
    tok_path = folder / "tokenizer.json"
    if load_tokenizer and tok_path.is_file():
        from ._tokenizer import Tokenizer  # lazy: the tokenizers package is optional

        tokenizer = Tokenizer.from_file(str(tok_path))
    return model, tokenizer
