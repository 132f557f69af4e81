"""GGUF loader (llama.cpp's file format) for every family of ``_families.py``, via
``gguf.GGUFReader``; tensor names come from the ``gguf`` package's own tables.

Tensors in F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are dequantized with vectorized NumPy (faster
than ``gguf.quants``: measured in tests/test_gguf.py); every other type ``gguf.quants`` can
dequantize (Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q2_K, Q3_K, IQ*, TQ*) goes through
``gguf.quants.dequantize``; all to float32, then cast to the requested dtype.

GGML lists dimensions fastest-first, so a matrix with ``ne = [in, out]`` reads as a NumPy array
of shape ``[out, in]`` (PyTorch's ``nn.Linear`` layout); it is transposed to the ``[in, out]``
layout of ``docs/CONTRACTS.md``. llama.cpp's converter permutes the rows of Q and K so that its
interleaved-pair rotary embedding reproduces Hugging Face's rotate-half one, hence
``rope_layout="interleaved"`` for GGUF models.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._common import parse_dtype
from ._tokenizer import Tokenizer

__all__ = ["load_gguf", "read_gguf_metadata", "dequantize_tensor"]



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


def _config_from_metadata(meta, tensors, path, tokenizer, family):
    """DecoderConfig from the ``{arch}.*`` metadata keys llama.cpp writes, and the family's
    switches (see ``_families.py``)."""
    from ._families import finish_config

    arch = family.gguf_arch

    def get(key, default=None, required=True):
        v = meta.get(f"{arch}.{key}", default)
        if v is None and required:
            raise ValueError(f"{path}: missing metadata key '{arch}.{key}'")
        return v

    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: missing tensor 'token_embd.weight'")
    embed_shape = [int(d) for d in reversed(tensors["token_embd.weight"].shape.tolist())]
    dim = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer lists exist in some files; require them uniform
        if len(set(n_kv)) != 1:
            raise ValueError(f"{path}: per-layer head_count_kv {n_kv} is not supported")
        n_kv = n_kv[0]
    head_dim = int(get("attention.key_length", dim // n_heads))
    kw: dict[str, Any] = {}
    if family.switches.get("positions") != "learned":
        rot = get("rope.dimension_count", head_dim)
        if int(rot) != head_dim:
            raise ValueError(f"{path}: partial rotary embeddings (rope.dimension_count={rot}, "
                             f"head_dim={head_dim}) are not supported")
        scaling = get("rope.scaling.type", None, required=False)
        if scaling == "linear":
            kw["rope_factor"] = float(get("rope.scaling.factor"))
        elif scaling not in (None, "none", "llama3"):
            raise ValueError(f"{path}: rope scaling {scaling!r} is not supported")
        if "rope_freqs.weight" in tensors:
            kw["rope_freq_factors"] = tuple(dequantize_tensor(tensors["rope_freqs.weight"]).reshape(-1).tolist())
        for t in ("rope_factors_long.weight", "rope_factors_short.weight"):
            if t in tensors:
                raise ValueError(f"{path}: LongRoPE ({t}) is not supported")
        kw["rope_theta"] = float(get("rope.freq_base", 10000.0))
        kw["rope_layout"] = family.gguf_rope_layout
    eps = get("attention.layer_norm_rms_epsilon", None, required=False)
    if eps is None:
        eps = get("attention.layer_norm_epsilon", 1e-5)
    kw.update(family.gguf_config(get))
    if family.gguf_norm_offset:
        kw["norm"] = "rms"  # the converter stored 1 + w
    if "hidden_dim" not in kw:
        kw["hidden_dim"] = int(get("feed_forward_length"))
    return finish_config(family, dict(
        vocab_size=embed_shape[0], dim=dim, n_layers=int(get("block_count")), n_heads=n_heads,
        n_kv_heads=int(n_kv), head_dim=head_dim, norm_eps=float(eps),
        max_seq_len=int(get("context_length", 2048)),
        tie_embeddings="output.weight" not in tensors,
        bos_id=tokenizer.bos_id if tokenizer is not None else None,
        eos_ids=tokenizer.eos_ids if tokenizer is not None else (), **kw))


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


_EXTRA_TENSORS = ("rope_freqs.weight",)


def load_gguf(path, *, dtype=jnp.float32, with_tokenizer: bool = True):
    """Loads a GGUF file of a supported architecture (``llama``, ``qwen2``, ``qwen3``, ``phi3``,
    ``gemma3``, ``gpt2``; see ``_families.py``).

    Returns ``(Decoder, Tokenizer)`` (the tokenizer is built from the file's own metadata;
    ``None`` when ``with_tokenizer=False``). ``dtype``: ``jnp.float32``/``jnp.bfloat16`` or
    "float32"/"bfloat16". Raises ValueError naming the file for truncated or corrupt files,
    unsupported architectures, or missing/unexpected tensors.
    """
    from ._decoder import Decoder, param_shapes
    from ._families import GGUF_ARCHS, GGUF_TENSORS, family_for_gguf

    dtype = parse_dtype(dtype)
    path = os.fspath(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    arch = meta.get("general.architecture")
    family = family_for_gguf(arch)
    if family is None:
        raise ValueError(f"{path}: unsupported architecture general.architecture={arch!r} "
                         f"(this loader supports {', '.join(repr(a) for a in GGUF_ARCHS)})")
    tokenizer = Tokenizer.from_gguf_metadata(meta, source=path) if with_tokenizer else None
    tensors = {t.name: t for t in reader.tensors}
    cfg = _config_from_metadata(meta, tensors, path, tokenizer, family)
    shapes = param_shapes(cfg)
    names = {key: GGUF_TENSORS[key] for key in list(shapes) + list(shapes["layers"]) if key != "layers"}
    expected = {names[k] for k in shapes if k != "layers"}
    expected |= {names[k].format(i=i) for k in shapes["layers"] for i in range(cfg.n_layers)}
    unknown = sorted(set(tensors) - expected - set(_EXTRA_TENSORS))
    if unknown:
        raise ValueError(f"{path}: unexpected tensors for a {arch} model: {unknown[:8]}"
                         + (" ..." if len(unknown) > 8 else ""))
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing tensors: {missing[:8]}" + (" ..." if len(missing) > 8 else ""))

    def check(arr, want, what):
        if tuple(arr.shape) != tuple(want):
            raise ValueError(f"{path}: tensor {what} has shape {tuple(arr.shape)}, expected "
                             f"{tuple(want)} from the metadata")
        return arr

    def is_matrix(key):  # GGML matrices read [out, in]; embedding tables are [rows, D] already
        return len(shapes["layers"].get(key, shapes.get(key, ()))) >= 2 and key not in ("embed", "pos_embed")

    params: dict[str, Any] = {"layers": {}}
    for key, shape in shapes["layers"].items():
        per_layer = [tensors[names[key].format(i=i)] for i in range(cfg.n_layers)]
        params["layers"][key] = _assemble(per_layer, len(shape) == 3, shape, dtype, check)
    for key, shape in shapes.items():
        if key != "layers":
            params[key] = _assemble(tensors[names[key]], is_matrix(key), shape, dtype, check)
    return Decoder(params, cfg), tokenizer
