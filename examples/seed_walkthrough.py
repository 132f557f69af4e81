"""The seed's walk-through (chapter 5 of "Build a Large Language Model (From Scratch)"), in JAX.

Toy vocabulary, the logits the model "returned" after "every effort moves you", then:
greedy decoding, multinomial sampling, temperature scaling (bar plot saved as a PNG when
matplotlib is installed), and top-k filtering. Run: ``python examples/seed_walkthrough.py``.
"""

from __future__ import annotations

import argparse
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

import jaxdecode
from jaxdecode import reference

VOCAB = {"closer": 0, "every": 1, "effort": 2, "forward": 3, "inches": 4, "moves": 5, "pizza": 6, "toward": 7, "you": 8}
INVERSE_VOCAB = {v: k for k, v in VOCAB.items()}
NEXT_TOKEN_LOGITS = jnp.array([4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79])


def main(plot_path: str | None = "temperature-plot.png", num_draws: int = 1000) -> dict:
    """Runs the walk-through, prints each step, and returns what it printed as a dict."""
    out: dict = {}

    # 1. Greedy decoding: the most likely next token.
    next_id = int(jaxdecode.greedy(NEXT_TOKEN_LOGITS))
    out["greedy"] = INVERSE_VOCAB[next_id]
    print("greedy next token:", out["greedy"])

    # 2. Multinomial sampling: draw from the distribution instead (one key, many rows).
    batch = jnp.broadcast_to(NEXT_TOKEN_LOGITS, (num_draws, len(VOCAB)))
    ids = jaxdecode.sample(jax.random.key(123), batch)
    counts = Counter(INVERSE_VOCAB[int(i)] for i in np.asarray(ids))
    out["counts"] = dict(counts)
    for word in VOCAB:
        print(f"{counts.get(word, 0):5d} x {word}")

    # 3. Temperature scaling: T < 1 sharpens, T > 1 flattens.
    temperatures = [1.0, 0.1, 5.0]
    scaled = [np.asarray(jax.nn.softmax(jaxdecode.apply_temperature(NEXT_TOKEN_LOGITS, t))) for t in temperatures]
    out["scaled"] = scaled
    for t, p in zip(temperatures, scaled):
        print(f"T={t:<4} " + " ".join(f"{x:.3f}" for x in p))
    if plot_path is not None:
        out["plot"] = _plot(temperatures, scaled, plot_path)

    # 4. Top-k: keep the 3 largest logits (and ties), -inf elsewhere, then softmax.
    top_logits, top_pos = jax.lax.top_k(NEXT_TOKEN_LOGITS, 3)
    print("Top logits:", np.asarray(top_logits), "Top positions:", np.asarray(top_pos))
    new_logits = jaxdecode.top_k_filter(NEXT_TOKEN_LOGITS, 3)
    print("masked logits:", np.asarray(new_logits))
    topk_probas = jax.nn.softmax(new_logits)
    print("top-k probas:", np.round(np.asarray(topk_probas), 4))
    out.update(top_logits=np.asarray(top_logits), top_pos=np.asarray(top_pos), masked=np.asarray(new_logits), topk_probas=np.asarray(topk_probas))

    # The NumPy reference gives the same numbers, framework-free.
    assert np.allclose(reference.top_k_filter(np.asarray(NEXT_TOKEN_LOGITS), 3), out["masked"])
    return out


def _plot(temperatures, scaled, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'jaxdecode[plot]'): skipping the plot")
        return None
    x = np.arange(len(VOCAB))
    bar_width = 0.15
    fig, ax = plt.subplots()
    for i, (t, p) in enumerate(zip(temperatures, scaled)):
        ax.bar(x + i * bar_width, p, bar_width, label=f"Temperature = {t}")
    ax.set_ylabel("Probability")
    ax.set_xticks(x)
    ax.set_xticklabels(VOCAB.keys(), rotation=90)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print("saved", path)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plot", default="temperature-plot.png", help="where to save the bar plot (PNG)")
    parser.add_argument("--draws", type=int, default=1000)
    args = parser.parse_args()
    main(args.plot, args.draws)
