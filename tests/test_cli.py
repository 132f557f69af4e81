"""The jaxdecode CLI on the default model: deterministic greedy text, JSON, samples, errors."""

import io
import json
import subprocess
import sys

import pytest

import jax
import jax.numpy as jnp
import numpy as np

import jaxdecode
from jaxdecode import _cli

_MODEL = []
_CACHE_FLAGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(autouse=True)
def _isolated_compilation_cache(tmp_path, monkeypatch):
    """The CLI turns on JAX's persistent compilation cache in this process: point it at a
    private folder (not the user's ~/.cache, which other processes may be writing), and turn
    it off again afterwards so the rest of the test session does not write every compiled
    program to disk."""
    from jax._src import compilation_cache

    monkeypatch.setenv("JAXDECODE_CACHE_DIR", str(tmp_path / "xla"))
    saved = {name: getattr(jax.config, name) for name in _CACHE_FLAGS}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def _default_model():
    """The default model and tokenizer, loaded once for the reference calls."""
    if not _MODEL:
        _MODEL.append(jaxdecode.models.load())
    return _MODEL[0]


def run(capsys, *argv):
    code = _cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_greedy_streams_prompt_and_continuation(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXDECODE_CACHE_DIR", str(tmp_path / "xla"))
    code, out, err = run(capsys, "every effort moves you", "--max-new-tokens", "6", "--temperature", "0")
    assert code == 0
    assert out.startswith("every effort moves you away from your friends.")
    assert "tokens/s" in err and "load" in err
    code2, out2, _ = run(capsys, "every effort moves you", "--max-new-tokens", "6")
    assert out2 == out  # greedy is deterministic (and the default)


def test_json_num_samples_and_seed(capsys):
    args = ["Once upon a time", "--max-new-tokens", "5", "--temperature", "0.9", "--top-p", "0.95", "--num-samples", "3", "--json"]
    code, out, _ = run(capsys, *args, "--seed", "1")
    assert code == 0
    data = json.loads(out)
    assert len(data["completions"]) == 3
    for c in data["completions"]:
        assert len(c["tokens"]) == len(c["logprobs"]) <= 5
        assert all(lp <= 0 for lp in c["logprobs"])
        assert c["finish_reason"] in ("stop", "length")
    assert data["prompt_tokens"] and data["timing"]["generated_tokens"] > 0
    _, again, _ = run(capsys, *args, "--seed", "1")
    assert [c["tokens"] for c in json.loads(again)["completions"]] == [c["tokens"] for c in data["completions"]]
    # The CLI's tokens and text are the library's: the same call through the API.
    model, tok = _default_model()
    ids = tok.encode("Once upon a time")
    assert data["prompt_tokens"] == ids
    out = jaxdecode.generate(model, jnp.array([ids]), 5, key=jax.random.key(1), num_samples=3,
                             sampling=jaxdecode.SamplingParams(temperature=0.9, top_p=0.95, eos_id=tok.eos_ids))
    for i, c in enumerate(data["completions"]):
        want = out.tokens[i, len(ids) : int(out.lengths[i])].tolist()
        assert c["tokens"] == want
        np.testing.assert_allclose(c["logprobs"], out.logprobs[i, : len(want)], atol=1e-5)
        body = want[:-1] if c["finish_reason"] == "stop" else want
        assert c["text"] == tok.decode(body, skip_special_tokens=True) and c["text"]


def test_stdin_prompt_and_chat(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2+2?\n"))
    code, out, _ = run(capsys, "--chat", "--max-new-tokens", "4", "--json")
    assert code == 0
    data = json.loads(out)
    assert "What is 2+2?" in data["prompt"] and "assistant" in data["prompt"]
    # Greedy (the default): the answer is the library's greedy continuation of the chat prompt.
    model, tok = _default_model()
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True)
    assert data["prompt"] == chat
    ids = tok.encode(chat)
    ref = jaxdecode.generate(model, jnp.array([ids]), 4, temperature=0.0)
    want = ref.tokens[0, len(ids) : int(ref.lengths[0])].tolist()
    (c,) = data["completions"]
    assert c["tokens"] == want and c["text"] == tok.decode(want, skip_special_tokens=True)
    assert c["text"].strip()  # a real answer, not only special tokens


@pytest.mark.parametrize(
    "args,message",
    [
        (["x", "--temperature", "-1"], "--temperature must be >= 0"),
        (["x", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ],
)
def test_bad_arguments_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        _cli.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_model_file(capsys, tmp_path):
    code, _, err = run(capsys, "x", "--model", str(tmp_path / "nope.gguf"))
    assert code == 2 and "nope.gguf" in err


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "jaxdecode", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--max-new-tokens" in proc.stdout
