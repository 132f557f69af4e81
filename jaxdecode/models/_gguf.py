"""GGUF loader for Llama-architecture models (llama.cpp's file format), via ``gguf.GGUFReader``.

Tensors in F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are dequantized with vectorized NumPy (other
GGML types through ``gguf.quants.dequantize``) to float32, then cast to the requested dtype.

GGML lists dimensions fastest-first, so a matrix with ``ne = [in, out]`` reads as a NumPy array
of shape ``[out, in]`` (PyTorch's ``nn.Linear`` layout); it is transposed to the ``[in, out]``
layout of ``docs/CONTRACTS.md``. llama.cpp's converter permutes the rows of Q and K so that its
interleaved-pair rotary embedding reproduces Hugging Face's rotate-half one, hence
``rope_layout="interleaved"`` for GGUF models.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._common import parse_dtype
from ._llama import Llama, LlamaConfig, llama_param_shapes
from ._tokenizer import Tokenizer

__all__ = ["load_gguf", "read_gguf_metadata", "dequantize_tensor"]

# GGUF tensor name -> (params key, transpose?)
_LAYER_TENSORS = {
    "attn_norm": ("attn_norm", False),
    "attn_q": ("wq", True),
    "attn_k": ("wk", True),
    "attn_v": ("wv", True),
    "attn_output": ("wo", True),
    "ffn_norm": ("mlp_norm", False),
    "ffn_gate": ("w_gate", True),
    "ffn_up": ("w_up", True),
    "ffn_down": ("w_down", True),
}
_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def _require_gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - dependency is in the "models" extra
        raise ImportError("loading GGUF files needs the `gguf` package: pip install gguf") from e
    return gguf


# ---------------------------------------------------------------------- dequantization
def _f16_pairs(b, start, count):
    """``count`` float16 values stored at byte ``start`` of every block row, as float32."""
    return np.ascontiguousarray(b[:, start:start + 2 * count]).view(np.float16).astype(np.float32)


def _nibbles(qs):
    # GGML's Q4 layout: element j of a block is the low nibble of byte j, element j+16 the high.
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _deq_q4_0(b):  # block: f16 d, 16 bytes of nibbles; x = d * (q - 8)
    d = _f16_pairs(b, 0, 1)
    q = _nibbles(b[:, 2:]).view(np.int8) - np.int8(8)
    return np.multiply(q, d, dtype=np.float32)


def _deq_q4_1(b):  # block: f16 d, f16 m, 16 bytes of nibbles; x = d * q + m
    dm = _f16_pairs(b, 0, 2)
    out = np.multiply(_nibbles(b[:, 4:]), dm[:, :1], dtype=np.float32)
    out += dm[:, 1:]
    return out


def _deq_q8_0(b):  # block: f16 d, 32 int8; x = d * q
    d = _f16_pairs(b, 0, 1)
    return np.multiply(b[:, 2:].view(np.int8), d, dtype=np.float32)


_FAST_BLOCKS = {"Q4_0": (32, 18, _deq_q4_0), "Q4_1": (32, 20, _deq_q4_1),
                "Q8_0": (32, 34, _deq_q8_0)}


def dequantize_tensor(tensor) -> np.ndarray:
    """A ``gguf.ReaderTensor`` as a float32 NumPy array of NumPy shape (reversed GGML dims)."""
    gguf = _require_gguf()
    qtype = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    name = qtype.name
    data = tensor.data
    if name == "F32":
        out = np.asarray(data, dtype=np.float32)
    elif name == "F16":
        out = np.asarray(data).astype(np.float32)
    elif name == "BF16":
        raw = np.ascontiguousarray(data).view(np.uint16).astype(np.uint32) << 16
        out = raw.view(np.float32)
    elif name in _FAST_BLOCKS:
        block, size, fn = _FAST_BLOCKS[name]
        out = fn(np.ascontiguousarray(data).reshape(-1, size))
    else:
        try:
            out = gguf.quants.dequantize(data, qtype)
        except NotImplementedError as e:
            raise ValueError(f"tensor {tensor.name}: unsupported GGML type {name}") from e
    return np.asarray(out, np.float32).reshape(shape)


# ---------------------------------------------------------------------- metadata
def _field_value(field):
    from gguf import GGUFValueType

    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY and len(types) > 1 and types[-1] != GGUFValueType.STRING:
        # Numeric array: one part per element; gather them in one go.
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    return field.contents()


_READER = None


def _reader_class():
    """``gguf.GGUFReader`` reading through a plain ndarray view of its memmap: the reader makes
    one small view per metadata item (~250k for a 49k-token vocabulary) and ``np.memmap``'s
    per-view bookkeeping makes that about 3x slower. Same parsing code, same results."""
    global _READER
    if _READER is None:
        gguf = _require_gguf()

        class _Reader(gguf.GGUFReader):
            def _get(self, *args, **kwargs):
                if type(self.data) is not np.ndarray:
                    self.data = self.data.view(np.ndarray)
                return super()._get(*args, **kwargs)

        _READER = _Reader
    return _READER


def _open(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read GGUF file: {e}") from e
    try:
        reader = _reader_class()(path)
    except Exception as e:  # truncated or corrupt header / tensor table
        raise ValueError(f"{path}: not a valid GGUF file (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from e
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ValueError(f"{path}: truncated GGUF file: tensor {t.name} needs bytes "
                             f"{t.data_offset}..{t.data_offset + t.n_bytes} but the file has "
                             f"{size} bytes")
    return reader


def read_gguf_metadata(path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file as Python values (lists for arrays)."""
    path = os.fspath(path)
    reader = _open(path)
    return _metadata(reader, path)


def _metadata(reader, path):
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = _field_value(field)
        except Exception as e:
            raise ValueError(f"{path}: corrupt metadata value {key!r}: {e}") from e
    return meta


def _config_from_metadata(meta, tensors, path, tokenizer):
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unsupported architecture general.architecture={arch!r} "
                         "(this loader supports 'llama')")

    def get(key, default=None, required=True):
        v = meta.get(f"llama.{key}", default)
        if v is None and required:
            raise ValueError(f"{path}: missing metadata key 'llama.{key}'")
        return v

    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: missing tensor 'token_embd.weight'")
    embed_shape = [int(d) for d in reversed(tensors["token_embd.weight"].shape.tolist())]
    vocab = embed_shape[0]
    dim = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer lists exist in some files; require them uniform
        if len(set(n_kv)) != 1:
            raise ValueError(f"{path}: per-layer head_count_kv {n_kv} is not supported")
        n_kv = n_kv[0]
    head_dim = int(get("attention.key_length", dim // n_heads))
    rot = get("rope.dimension_count", head_dim)
    if int(rot) != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings (rope.dimension_count={rot}, "
                         f"head_dim={head_dim}) are not supported")
    factors = None
    scaling = get("rope.scaling.type", None, required=False)
    if scaling not in (None, "none", "llama3"):
        if scaling == "linear":
            factors = (float(get("rope.scaling.factor")),) * (head_dim // 2)
        else:
            raise ValueError(f"{path}: rope scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in tensors:
        factors = tuple(dequantize_tensor(tensors["rope_freqs.weight"]).reshape(-1).tolist())
    eos = tokenizer.eos_ids if tokenizer is not None else ()
    return LlamaConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=head_dim,
        hidden_dim=int(get("feed_forward_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_layout="interleaved",
        max_seq_len=int(get("context_length", 2048)),
        tie_embeddings="output.weight" not in tensors,
        bos_id=tokenizer.bos_id if tokenizer is not None else None,
        eos_ids=eos,
        rope_freq_factors=factors,
    )


# ---------------------------------------------------------------------- params
def _assemble(tensors, transpose: bool, shape, dtype, check):
    """Dequantizes ``tensors`` (one per layer, or a single one when ``shape`` has no layer
    axis) into one preallocated host array of the final layout and dtype."""
    out = np.empty(shape, np.dtype(dtype))
    if not isinstance(tensors, list):
        tensors, out_view = [tensors], out[None]
    else:
        out_view = out
    for i, t in enumerate(tensors):
        arr = check(dequantize_tensor(t), out_view.shape[1:][::-1] if transpose
                    else out_view.shape[1:], t.name)
        out_view[i] = arr.T if transpose else arr
    return jnp.asarray(out)


def load_gguf(path, *, dtype=jnp.float32, with_tokenizer: bool = True):
    """Loads a Llama-architecture GGUF file.

    Returns ``(Llama, Tokenizer)`` (the tokenizer is built from the file's own metadata;
    ``None`` when ``with_tokenizer=False``). ``dtype``: ``jnp.float32``/``jnp.bfloat16`` or
    "float32"/"bfloat16". Raises ValueError naming the file for truncated or corrupt files,
    unsupported architectures, or missing/unexpected tensors.
    """
    dtype = parse_dtype(dtype)
    path = os.fspath(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path}: unsupported architecture general.architecture="
                         f"{meta.get('general.architecture')!r} (this loader supports 'llama')")
    tokenizer = Tokenizer.from_gguf_metadata(meta, source=path) if with_tokenizer else None
    tensors = {t.name: t for t in reader.tensors}
    cfg = _config_from_metadata(meta, tensors, path, tokenizer)
    L = cfg.n_layers

    # Group the per-layer tensors; every expected one must be there, nothing unknown.
    per_layer: dict[str, list] = {k: [None] * L for k, _ in _LAYER_TENSORS.values()}
    unknown = []
    for name, t in tensors.items():
        m = _BLK_RE.match(name)
        if m and m.group(2) in _LAYER_TENSORS and int(m.group(1)) < L:
            per_layer[_LAYER_TENSORS[m.group(2)][0]][int(m.group(1))] = t
        elif name not in ("token_embd.weight", "output_norm.weight", "output.weight",
                          "rope_freqs.weight"):
            unknown.append(name)
    if unknown:
        raise ValueError(f"{path}: unexpected tensors for a llama model: {unknown[:8]}"
                         + (" ..." if len(unknown) > 8 else ""))
    missing = [f"blk.{i}.{g}.weight" for g, (k, _) in _LAYER_TENSORS.items()
               for i in range(L) if per_layer[k][i] is None]
    if "output_norm.weight" not in tensors:
        missing.append("output_norm.weight")
    if missing:
        raise ValueError(f"{path}: missing tensors: {missing[:8]}"
                         + (" ..." if len(missing) > 8 else ""))

    shapes = llama_param_shapes(cfg)

    def check(arr, expected, what):
        if tuple(arr.shape) != tuple(expected):
            raise ValueError(f"{path}: tensor {what} has shape {tuple(arr.shape)}, expected "
                             f"{tuple(expected)} from the metadata")
        return arr

    params: dict[str, Any] = {"layers": {}}
    for key, transpose in _LAYER_TENSORS.values():
        params["layers"][key] = _assemble(per_layer[key], transpose, shapes["layers"][key],
                                          dtype, check)
    params["embed"] = _assemble(tensors["token_embd.weight"], False, shapes["embed"], dtype, check)
    params["norm"] = _assemble(tensors["output_norm.weight"], False, shapes["norm"], dtype, check)
    if not cfg.tie_embeddings:
        params["lm_head"] = _assemble(tensors["output.weight"], True, shapes["lm_head"], dtype,
                                      check)
    return Llama(params, cfg), tokenizer
