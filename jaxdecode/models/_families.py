"""The families :class:`~jaxdecode.models._decoder.Decoder` runs, as data: for each, how a
Hugging Face ``config.json`` or a GGUF file's metadata becomes a :class:`DecoderConfig`, and
where each parameter lives in either file.

Adding a family is one :class:`Family` entry: its config switches and, where its Hugging Face
names differ from Llama's, a name table. GGUF tensor names are not written here: they come from
the ``gguf`` package's own tables (``gguf.constants.TENSOR_NAMES``) through :data:`GGUF_TENSORS`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

from ._decoder import DecoderConfig

__all__ = ["Family", "FAMILIES", "HF_MODEL_TYPES", "GGUF_ARCHS", "GGUF_TENSORS", "gpt2_config",
           "family_for_hf", "family_for_gguf"]


class Family(NamedTuple):
    """One model family.

    Attributes:
      name: the family's name (``DecoderConfig.family``).
      hf_model_types: ``config.json`` ``model_type`` values it loads.
      gguf_arch: ``general.architecture`` of its GGUF files (None: no GGUF support).
      switches: DecoderConfig switches common to the family.
      hf_config: ``config.json`` dict -> extra DecoderConfig keyword arguments (family-specific).
      hf_names: param name -> Hugging Face tensor name (``{i}`` is the layer) and its layout:
        ``"linear"`` (``nn.Linear`` ``[out, in]``, transposed), ``"conv1d"`` (``[in, out]``),
        ``"vector"`` or ``"table"`` (embeddings, ``[rows, D]``).
      hf_prefix: prefix stripped from stored names (``model.``, ``transformer.``).
      gguf_config: GGUF metadata getter -> extra DecoderConfig keyword arguments.
      gguf_rope_layout: the rotary layout of its GGUF files (llama.cpp permutes Llama's Q/K for
        its interleaved rope; NEOX-style families keep Hugging Face's rotate-half).
      gguf_norm_offset: llama.cpp's converter stored ``1 + w`` for Gemma's norms, so GGUF
        Gemma files use plain RMSNorm.
    """

    name: str
    hf_model_types: tuple
    gguf_arch: str | None
    switches: Mapping[str, Any]
    hf_config: Callable[[dict], dict]
    hf_names: Mapping[str, tuple]
    hf_prefix: tuple
    gguf_config: Callable[[Callable], dict]
    gguf_rope_layout: str = "half"
    gguf_norm_offset: bool = False


# --------------------------------------------------------------------------- name tables
def _layer(name, kind="linear"):
    return ("layers.{i}." + name, kind)


LLAMA_HF_NAMES = {
    "embed": ("embed_tokens.weight", "table"),
    "norm": ("norm.weight", "vector"),
    "lm_head": ("lm_head.weight", "linear"),
    "attn_norm": _layer("input_layernorm.weight", "vector"),
    "wq": _layer("self_attn.q_proj.weight"), "bq": _layer("self_attn.q_proj.bias", "vector"),
    "wk": _layer("self_attn.k_proj.weight"), "bk": _layer("self_attn.k_proj.bias", "vector"),
    "wv": _layer("self_attn.v_proj.weight"), "bv": _layer("self_attn.v_proj.bias", "vector"),
    "q_norm": _layer("self_attn.q_norm.weight", "vector"),
    "k_norm": _layer("self_attn.k_norm.weight", "vector"),
    "wo": _layer("self_attn.o_proj.weight"), "bo": _layer("self_attn.o_proj.bias", "vector"),
    "mlp_norm": _layer("post_attention_layernorm.weight", "vector"),
    "w_gate": _layer("mlp.gate_proj.weight"), "w_up": _layer("mlp.up_proj.weight"),
    "w_down": _layer("mlp.down_proj.weight"),
}

PHI3_HF_NAMES = {**LLAMA_HF_NAMES,
                 "wqkv": _layer("self_attn.qkv_proj.weight"),
                 "w_gate_up": _layer("mlp.gate_up_proj.weight")}

GEMMA3_HF_NAMES = {**LLAMA_HF_NAMES,
                   "post_attn_norm": _layer("post_attention_layernorm.weight", "vector"),
                   "mlp_norm": _layer("pre_feedforward_layernorm.weight", "vector"),
                   "post_mlp_norm": _layer("post_feedforward_layernorm.weight", "vector")}


def _h(name, kind="conv1d"):
    return ("h.{i}." + name, kind)


GPT2_HF_NAMES = {
    "embed": ("wte.weight", "table"), "pos_embed": ("wpe.weight", "table"),
    "norm": ("ln_f.weight", "vector"), "norm_bias": ("ln_f.bias", "vector"),
    "lm_head": ("lm_head.weight", "linear"),
    "attn_norm": _h("ln_1.weight", "vector"), "attn_norm_bias": _h("ln_1.bias", "vector"),
    "wqkv": _h("attn.c_attn.weight"), "bqkv": _h("attn.c_attn.bias", "vector"),
    "wo": _h("attn.c_proj.weight"), "bo": _h("attn.c_proj.bias", "vector"),
    "mlp_norm": _h("ln_2.weight", "vector"), "mlp_norm_bias": _h("ln_2.bias", "vector"),
    "w_up": _h("mlp.c_fc.weight"), "b_up": _h("mlp.c_fc.bias", "vector"),
    "w_down": _h("mlp.c_proj.weight"), "b_down": _h("mlp.c_proj.bias", "vector"),
}


def _gguf_tensor_table() -> dict:
    """param name -> GGUF tensor name (``{i}`` the layer), from gguf's own name table."""
    from gguf.constants import MODEL_TENSOR as T
    from gguf.constants import TENSOR_NAMES

    def n(t, suffix="weight"):
        return TENSOR_NAMES[t].replace("{bid}", "{i}") + "." + suffix

    return {
        "embed": n(T.TOKEN_EMBD), "pos_embed": n(T.POS_EMBD),
        "norm": n(T.OUTPUT_NORM), "norm_bias": n(T.OUTPUT_NORM, "bias"), "lm_head": n(T.OUTPUT),
        "attn_norm": n(T.ATTN_NORM), "attn_norm_bias": n(T.ATTN_NORM, "bias"),
        "wq": n(T.ATTN_Q), "wk": n(T.ATTN_K), "wv": n(T.ATTN_V), "wqkv": n(T.ATTN_QKV),
        "bq": n(T.ATTN_Q, "bias"), "bk": n(T.ATTN_K, "bias"), "bv": n(T.ATTN_V, "bias"),
        "bqkv": n(T.ATTN_QKV, "bias"),
        "q_norm": n(T.ATTN_Q_NORM), "k_norm": n(T.ATTN_K_NORM),
        "wo": n(T.ATTN_OUT), "bo": n(T.ATTN_OUT, "bias"),
        "post_attn_norm": n(T.ATTN_POST_NORM),
        "mlp_norm": n(T.FFN_NORM), "mlp_norm_bias": n(T.FFN_NORM, "bias"),
        "w_gate": n(T.FFN_GATE), "w_up": n(T.FFN_UP), "w_gate_up": n(T.FFN_UP),  # Phi-3: up = gate|up
        "b_up": n(T.FFN_UP, "bias"), "w_down": n(T.FFN_DOWN), "b_down": n(T.FFN_DOWN, "bias"),
        "post_mlp_norm": n(T.FFN_POST_NORM),
    }


class _LazyTable(Mapping):
    """:func:`_gguf_tensor_table`, built on first use (``gguf`` is an optional dependency)."""

    _table = None

    def _t(self):
        if _LazyTable._table is None:
            _LazyTable._table = _gguf_tensor_table()
        return _LazyTable._table

    def __getitem__(self, k):
        return self._t()[k]

    def __iter__(self):
        return iter(self._t())

    def __len__(self):
        return len(self._t())


GGUF_TENSORS: Mapping[str, str] = _LazyTable()


# --------------------------------------------------------------------------- HF config helpers
def _layer_types(cfg: dict, n_layers: int):
    """``layer_types`` of transformers >= 4.5x configs ("sliding_attention" / "full_attention")."""
    lt = cfg.get("layer_types")
    if not lt:
        return None
    return tuple("sliding" if t == "sliding_attention" else "full" for t in lt)


def _rope_params(cfg: dict, layer_type: str = "full_attention") -> dict:
    """The rope parameters for one layer type: transformers 5 ``rope_parameters`` (flat, or per
    layer type) or 4.x ``rope_theta`` / ``rope_scaling``."""
    rp = cfg.get("rope_parameters") or {}
    if isinstance(rp, dict) and layer_type in rp and isinstance(rp[layer_type], dict):
        rp = rp[layer_type]
    elif isinstance(rp, dict) and rp and not ("rope_type" in rp or "rope_theta" in rp):
        rp = {}
    out = dict(cfg.get("rope_scaling") or {})
    out.update(rp)
    out.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return out


def _plain_rope(cfg: dict, what: str, layer_type: str = "full_attention") -> dict:
    """rope_theta and (linear scaling) rope_freq_factors; other scaling types are refused."""
    rp = _rope_params(cfg, layer_type)
    kind = rp.get("rope_type", rp.get("type")) or "default"
    out: dict[str, Any] = {"rope_theta": float(rp["rope_theta"])}
    if kind == "linear":
        out["rope_factor"] = float(rp["factor"])
    elif kind != "default":
        raise ValueError(f"{what}: rope scaling type {kind!r} is not supported (only plain and linear RoPE)")
    return out


def _llama_hf(cfg: dict) -> dict:
    if cfg.get("mlp_bias", False):
        raise ValueError("mlp_bias=true is not supported")
    bias = bool(cfg.get("attention_bias", False))
    out = {"qkv_bias": bias, "out_bias": bias}
    if cfg.get("sliding_window") and cfg.get("model_type") == "mistral":
        out["sliding_window"] = int(cfg["sliding_window"])
    return out


def _qwen2_hf(cfg: dict) -> dict:
    out = {"qkv_bias": True}
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        out["sliding_window"] = int(cfg["sliding_window"])
    return out


def _qwen3_hf(cfg: dict) -> dict:
    out = {"qkv_bias": bool(cfg.get("attention_bias", False)),
           "out_bias": bool(cfg.get("attention_bias", False))}
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        out["sliding_window"] = int(cfg["sliding_window"])
    return out


def _phi3_hf(cfg: dict) -> dict:
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"partial_rotary_factor={cfg['partial_rotary_factor']} is not supported")
    out = {}
    if cfg.get("sliding_window"):
        out["sliding_window"] = int(cfg["sliding_window"])
    return out


def _gemma3_hf(cfg: dict) -> dict:
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise ValueError(f"Gemma 3 hidden_activation {act!r} is not supported")
    local = _plain_rope(cfg, "Gemma 3", "sliding_attention")
    if "rope_factor" in local:
        raise ValueError("Gemma 3: rope scaling on sliding layers is not supported")
    if "sliding_attention" not in (cfg.get("rope_parameters") or {}):
        local = {"rope_theta": float(cfg.get("rope_local_base_freq", 10000.0))}
    return {
        "embed_scale": math.sqrt(int(cfg["hidden_size"])),
        "attn_scale": float(cfg.get("query_pre_attn_scalar", cfg.get("head_dim", 256))) ** -0.5,
        "rope_local_theta": local["rope_theta"],
        "attn_softcap": cfg.get("attn_logit_softcapping"),
        "final_softcap": cfg.get("final_logit_softcapping"),
        "sliding_window": cfg.get("sliding_window"),
        "pattern": int(cfg.get("sliding_window_pattern", 6)),
    }


def _gpt2_hf(cfg: dict) -> dict:
    act = cfg.get("activation_function", "gelu_new")
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
    if act not in acts:
        raise ValueError(f"GPT-2 activation_function {act!r} is not supported")
    for key, bad in (("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True),
                     ("add_cross_attention", True)):
        if bool(cfg.get(key, not bad)) == bad:
            raise ValueError(f"{key}={str(bad).lower()} is not supported")
    return {"activation": acts[act]}


# --------------------------------------------------------------------------- GGUF config helpers
def _gguf_none(get) -> dict:
    return {}


def _gguf_gemma3(get) -> dict:
    dim = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", dim // int(get("attention.head_count"))))
    scale = get("attention.scale", None, required=False)  # llama.cpp: 1 / sqrt(head_dim) unless stored
    pattern = get("attention.sliding_window_pattern", 6, required=False)  # llama.cpp's default: 6
    out = {}
    if isinstance(pattern, list):  # per layer: true = sliding
        out["layer_types"] = tuple("sliding" if p else "full" for p in pattern)
        pattern = None
    return {**out, "embed_scale": math.sqrt(dim), "attn_scale": float(scale) if scale else head_dim ** -0.5,
            # llama.cpp's fixed local rope base for Gemma 3 (not stored in its files)
            "rope_local_theta": 10000.0, "sliding_window": int(get("attention.sliding_window")),
            "pattern": pattern,
            "attn_softcap": get("attn_logit_softcapping", None, required=False),
            "final_softcap": get("final_logit_softcapping", None, required=False)}


def _gguf_sliding(get) -> dict:
    w = get("attention.sliding_window", None, required=False)
    return {"sliding_window": int(w)} if w else {}


_GEMMA3_SWITCHES = dict(norm="rms_plus_one", qk_norm=True, post_norms=True, activation="gelu_tanh",
                        tie_embeddings=True, norm_eps=1e-6)

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral"), "llama", {}, _llama_hf, LLAMA_HF_NAMES, ("model.",),
           _gguf_sliding, gguf_rope_layout="interleaved"),
    Family("qwen2", ("qwen2",), "qwen2", dict(qkv_bias=True), _qwen2_hf, LLAMA_HF_NAMES, ("model.",),
           _gguf_none),
    Family("qwen3", ("qwen3",), "qwen3", dict(qk_norm=True), _qwen3_hf, LLAMA_HF_NAMES, ("model.",),
           _gguf_none),
    Family("phi3", ("phi3",), "phi3", dict(fused_qkv=True, fused_gate_up=True), _phi3_hf, PHI3_HF_NAMES,
           ("model.",), _gguf_sliding),
    Family("gemma3", ("gemma3_text",), "gemma3", _GEMMA3_SWITCHES, _gemma3_hf, GEMMA3_HF_NAMES,
           ("model.language_model.", "model."), _gguf_gemma3, gguf_norm_offset=True),
    Family("gpt2", ("gpt2",), "gpt2", dict(norm="layer", positions="learned", gated_mlp=False, fused_qkv=True,
                                           qkv_bias=True, out_bias=True, mlp_bias=True, activation="gelu_tanh",
                                           tie_embeddings=True),
           _gpt2_hf, GPT2_HF_NAMES, ("transformer.",), _gguf_none),
)

HF_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.hf_model_types)
GGUF_ARCHS = tuple(f.gguf_arch for f in FAMILIES if f.gguf_arch)


def family_for_hf(model_type) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.hf_model_types), None)


def family_for_gguf(arch) -> Family | None:
    return next((f for f in FAMILIES if f.gguf_arch == arch), None)


def finish_config(family: Family, kw: dict) -> DecoderConfig:
    """DecoderConfig from the family's switches and the file's values; resolves the two
    derived keys ``pattern`` (every pattern-th layer is global, the rest sliding) and
    ``rope_factor`` (linear rope scaling as per-frequency factors)."""
    kw = {**family.switches, **{k: v for k, v in kw.items() if v is not None}}
    pattern = kw.pop("pattern", None)
    if pattern and kw.get("sliding_window") and "layer_types" not in kw:
        kw["layer_types"] = tuple("full" if (i + 1) % pattern == 0 else "sliding"
                                  for i in range(kw["n_layers"]))
    factor = kw.pop("rope_factor", None)
    if factor is not None:
        hd = kw.get("head_dim") or kw["dim"] // kw["n_heads"]
        kw["rope_freq_factors"] = (factor,) * (hd // 2)
    return DecoderConfig(family=family.name, **kw)


def gpt2_config(vocab_size: int = 50257, max_seq_len: int = 1024, dim: int = 768, n_layers: int = 12,
                n_heads: int = 12, norm_eps: float = 1e-5, tie_embeddings: bool = True,
                mlp_dim: int | None = None, activation: str = "gelu_tanh") -> DecoderConfig:
    """A GPT-2 :class:`DecoderConfig` (defaults: the 124M model, "GPT_CONFIG_124M" of the
    "from scratch" book: V=50257, 1024 positions, D=768, 12 layers, 12 heads, MLP 4D).

    Example:
      >>> from jaxdecode.models import gpt2_config
      >>> cfg = gpt2_config(vocab_size=64, max_seq_len=32, dim=32, n_layers=2, n_heads=2)
      >>> cfg.family, cfg.norm, cfg.positions, cfg.hidden_dim
      ('gpt2', 'layer', 'learned', 128)
    """
    return finish_config(family_for_hf("gpt2"), dict(vocab_size=vocab_size, max_seq_len=max_seq_len, dim=dim,
                                    n_layers=n_layers, n_heads=n_heads, norm_eps=norm_eps,
                                    tie_embeddings=tie_embeddings, hidden_dim=mlp_dim or 4 * dim,
                                    activation=activation))


_BOOK_NAMES = {
    "context_length": "max_seq_len", "n_positions": "max_seq_len", "n_ctx": "max_seq_len",
    "emb_dim": "dim", "n_embd": "dim", "hidden_size": "dim",
    "n_layer": "n_layers", "num_hidden_layers": "n_layers",
    "n_head": "n_heads", "num_attention_heads": "n_heads",
    "layer_norm_epsilon": "norm_eps", "tie_word_embeddings": "tie_embeddings", "n_inner": "mlp_dim",
}


def gpt2_config_from_dict(d: Mapping[str, Any]) -> DecoderConfig:
    """:func:`gpt2_config` from a dict with its own names, Hugging Face's ``GPT2Config``
    names, or the "from scratch" book's ``GPT_CONFIG_124M`` names (``vocab_size,
    context_length, emb_dim, n_heads, n_layers``; ``drop_rate`` and ``qkv_bias`` are ignored:
    there is no dropout at inference, and a model without QKV bias has zero ``bqkv``). The
    book's model has a separate output head, so ``emb_dim`` without ``tie_embeddings`` unties.

    Example:
      >>> from jaxdecode.models._families import gpt2_config_from_dict
      >>> cfg = gpt2_config_from_dict({"vocab_size": 50257, "context_length": 256, "emb_dim": 768,
      ...                              "n_heads": 12, "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False})
      >>> cfg.max_seq_len, cfg.tie_embeddings
      (256, False)
    """
    import inspect

    allowed = set(inspect.signature(gpt2_config).parameters)
    kw: dict[str, Any] = {}
    for k, v in d.items():
        name = _BOOK_NAMES.get(k, k)
        if name in allowed and name not in kw:
            kw[name] = v
    if "emb_dim" in d and "tie_embeddings" not in kw:
        kw["tie_embeddings"] = False
    return gpt2_config(**kw)
