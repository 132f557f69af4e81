"""Draft models for speculative decoding, cut from the target itself."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import jax

M = TypeVar("M")


def first_layers(model: M, n_layers: int) -> M:
    """The model's first ``n_layers`` blocks with its own embedding, final norm and head.

    A free draft model for :func:`jaxdecode.draft_model`: it shares the tokenizer and the
    weights (no copy: the stacked layer arrays are sliced), and costs about
    ``n_layers / L`` of a target forward pass plus the head.

    Args:
      model: a :class:`Decoder` (any family).
      n_layers: 1 <= n_layers <= the model's layer count.

    Example:
      >>> import jax, jaxdecode
      >>> from jaxdecode.models import Llama, LlamaConfig, first_layers
      >>> target = Llama.init(jax.random.key(0), LlamaConfig(vocab_size=32, dim=16, n_layers=4, n_heads=2))
      >>> first_layers(target, 1).config.n_layers
      1
    """
    config = getattr(model, "config", None)
    total = getattr(config, "n_layers", None)
    if total is None or not isinstance(getattr(model, "params", None), dict) or "layers" not in model.params:
        raise TypeError(f"first_layers: `model` must be a jaxdecode.models Decoder, got {type(model).__name__}.")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= total:
        raise ValueError(f"first_layers: `n_layers` must be an int in [1, {total}] (the model's layer count), got {n_layers!r}.")
    params = dict(model.params)
    layers = model.params["layers"]
    per_layer = getattr(layers, "layers", None)
    if per_layer is not None:  # a LayerStack of per-layer buffers: keep them as they are
        params["layers"] = type(layers)(per_layer[:n_layers])
    else:
        params["layers"] = jax.tree.map(lambda x: x[:n_layers], dict(layers))
    return type(model)(params, dataclasses.replace(config, n_layers=n_layers))
