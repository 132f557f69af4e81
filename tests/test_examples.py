"""The examples run and print what they claim (each example's main() returns its results)."""

import importlib.util
import pathlib

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_walkthrough(tmp_path):
    out = _load("seed_walkthrough").main(plot_path=str(tmp_path / "t.png"), num_draws=2000)
    assert out["greedy"] == "forward"
    assert out["top_pos"].tolist() == [3, 7, 0]
    np.testing.assert_allclose(out["topk_probas"][[0, 3, 7]], [0.0615, 0.5775, 0.3610], atol=1e-4)
    # Multinomial counts follow the softmax: "forward" about 57%, "toward" about 36%.
    assert 0.53 < out["counts"]["forward"] / 2000 < 0.62
    assert 0.32 < out["counts"]["toward"] / 2000 < 0.40
    assert out["plot"] is not None and (tmp_path / "t.png").stat().st_size > 1000


def test_default_model_example():
    out = _load("default_model").main(max_new_tokens=8)
    assert out["greedy"].startswith(" away from your friends.")
    # A sampled (seeded) answer about the question's subject, special tokens stripped.
    assert out["chat"].startswith("JAX") and len(out["chat"]) > len("JAX ")
    assert "<|" not in out["chat"]


def test_many_prompts_example():
    texts = _load("many_prompts").main(max_new_tokens=6)
    assert len(texts) == 4
    assert texts[0].startswith(" away from your")  # the greedy row
