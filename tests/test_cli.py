"""The jaxdecode CLI: flags generated from SamplingParams, the library's checks, stop strings,
samples, beams, speculative decoding, top logprobs, timing, chat, and clean exits (a
pseudo-terminal for the status line and Ctrl-C, a closed pipe).

Most runs use the tiny GPT-2 fixture (vocabulary 64, 32 positions) so they compile in
seconds; the embedded SmolLM2 runs are marked slow.
"""

import dataclasses
import io
import json
import os
import pathlib
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

import jax
import jax.numpy as jnp
import numpy as np

import jaxdecode
from jaxdecode import _cli
from conftest import private_cache_dir

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "fixtures" / "gpt2_tiny")
_MODELS = {}
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


def _load(path=None):
    if path not in _MODELS:
        _MODELS[path] = jaxdecode.models.load(path)
    return _MODELS[path]


def run(capsys, *argv):
    code = _cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _env(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAXDECODE_CACHE_DIR=private_cache_dir(tmp_path))
    env.pop("COLUMNS", None)
    return env


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The tiny GPT-2 weights with a word-level tokenizer that has ChatML's special tokens, so
    a two-turn conversation fits its 32 positions."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    words = (["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "\n", " "]
             + [f"w{i}" for i in range(20)] + list("abcdefghijklmnopqrstuvwxyz")
             + ["hi", "hello", "there", "bye", "ok", "yes", "no", "the", "cat", "dog"])
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|\s|[^\w\s]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    folder = tmp_path_factory.mktemp("chat_model")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(TINY, name), folder)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return str(folder)


# ---------------------------------------------------------------------------------------
# Flags generated from SamplingParams


def test_every_sampling_field_has_a_flag_with_llama_cli_names():
    flags = _cli.sampling_flags()
    fields = [f.name for f in dataclasses.fields(jaxdecode.SamplingParams)]
    assert list(flags) == fields
    help_text = _cli.build_parser().format_help()
    for name, names in flags.items():
        assert names[-1] == "--" + name.replace("_", "-")  # the API name always works
        assert names[0] in help_text
    assert flags["temperature"][0] == "--temp" and flags["typical_p"][0] == "--typical"
    assert flags["repetition_penalty"][0] == "--repeat-penalty"
    for llama in ("--top-k", "--top-p", "--min-p", "--presence-penalty", "--frequency-penalty", "--logit-bias",
                  "--stop", "--min-new-tokens", "--ignore-eos", "--seed", "-n", "--beams", "--speculative",
                  "--top-logprobs", "--version", "--quiet", "--chat", "--system"):
        assert llama in help_text, llama
    # The help is the field's docstring line.
    assert _cli.field_docs(jaxdecode.SamplingParams)["min_p"] == "in [0, 1]; 0 is off."
    assert "in [0, 1]; 0 is off." in " ".join(help_text.split())


def test_a_new_field_gets_a_flag_with_no_edit(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Params:
        """Knobs.

        Attributes:
          top_n_sigma: >= 0; keeps tokens within n standard deviations
            of the top logit. 0 is off.
          xtc_probability: in [0, 1]; 0 is off.
          dry_allowed_length: int >= 1.
          dry_sequence_breakers: strings that break DRY sequences.
          fancy_flag: a switch.
        """

        top_n_sigma: float = 0.0
        xtc_probability: float = 0.0
        dry_allowed_length: int = 2
        dry_sequence_breakers: tuple = ("\n",)
        fancy_flag: bool = False

    monkeypatch.setattr(jaxdecode._settings, "SamplingParams", Params)
    parser = _cli.build_parser()
    args = parser.parse_args(["x", "--top-nsigma", "1.5", "--xtc-probability", "0.25", "--dry-allowed-length", "3",
                              "--dry-sequence-breaker", "\\n", "--dry-sequence-breaker", ":", "--fancy-flag"])
    assert _cli.sampling_values(args) == {"top_n_sigma": 1.5, "xtc_probability": 0.25, "dry_allowed_length": 3,
                                          "dry_sequence_breakers": ["\n", ":"], "fancy_flag": True}
    assert _cli.sampling_values(parser.parse_args(["x", "--top-n-sigma", "2"])) == {"top_n_sigma": 2.0}
    help_text = " ".join(parser.format_help().split())
    assert "--top-nsigma" in help_text and "keeps tokens within n standard deviations of the top logit" in help_text


def test_special_value_flags_parse_like_llama_cli():
    args = _cli.build_parser().parse_args(
        ["x", "--logit-bias", "15043+1", "--logit-bias", "7-inf", "--logit-bias", "9=-2.5", "--stop", "\\n\\n",
         "--stop", "User:", "--stop-sequences", "13,13", "--eos-id", "2,0", "--temp", "0.7"])
    values = _cli.sampling_values(args)
    assert values == {"logit_bias": {15043: 1.0, 7: -np.inf, 9: -2.5}, "stop": ["\n\n", "User:"],
                      "stop_sequences": [[13, 13]], "eos_id": [2, 0], "temperature": 0.7}
    params = _cli.build_sampling(values)
    assert params.stop == ("\n\n", "User:") and params.eos_id == (2, 0)


@pytest.mark.parametrize("argv,field,value", [
    (["--top-p", "1.5"], "top_p", 1.5),
    (["--temp", "inf"], "temperature", float("inf")),
    (["--temperature", "-1"], "temperature", -1.0),
    (["--min-new-tokens", "-2"], "min_new_tokens", -2),
    (["--repeat-penalty", "0"], "repetition_penalty", 0.0),
    (["--stop", ""], "stop", [""]),
])
def test_flag_values_are_checked_by_the_library(capsys, argv, field, value):
    with pytest.raises((ValueError, TypeError)) as lib:
        jaxdecode.SamplingParams(**{field: value})
    code, out, err = run(capsys, "x", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and str(lib.value) in err  # one line: the library's own message
    assert err.startswith(f"jaxdecode: error: {_cli.sampling_flags()[field][0]}: ")


@pytest.mark.parametrize("argv,message", [
    (["x", "--system", "be brief"], "--system needs --chat"),
    (["x", "--top-logprobs", "3"], "--top-logprobs is shown in --json output"),
    (["x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["x", "--speculative", "nope"], "--speculative must be 'prompt-lookup' or 'draft:N'"),
    (["x", "--top-k", "1.5"], "argument --top-k: invalid int value: '1.5'"),
    (["x", "--bogus"], "unrecognized arguments: --bogus"),
    (["x", "--ignore-eos", "--eos-id", "3"], "--ignore-eos and --eos-id contradict each other"),
    (["x", "-p", "y"], "give the prompt once"),
])
def test_user_errors_are_one_line_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err and "Traceback" not in err


def test_missing_model_file(capsys, tmp_path):
    code, _, err = run(capsys, "x", "--model", str(tmp_path / "nope.gguf"))
    assert code == 2 and "nope.gguf" in err and err.count("\n") == 1


def test_version_and_help(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith(f"jaxdecode {jaxdecode.__version__} (jax ")
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "--max-new-tokens" in out


# ---------------------------------------------------------------------------------------
# Runs on the tiny model, against the library


def _tiny_generate(prompt, n, **kw):
    model, tok = _load(TINY)
    ids = tok.encode(prompt)
    out = jaxdecode.generate(model, jnp.array([ids]), n, eos_id=tok.eos_ids, **kw)
    return model, tok, ids, out


def test_greedy_json_equals_the_library(capsys):
    code, out, err = run(capsys, "hello world", "-m", TINY, "-n", "10", "--json")
    assert code == 0
    data = json.loads(out)
    _, tok, ids, ref = _tiny_generate("hello world", 10, temperature=0.0)
    (c,) = data["completions"]
    assert data["prompt_tokens"] == ids
    assert c["tokens"] == ref.tokens[0, len(ids): int(ref.lengths[0])].tolist()
    np.testing.assert_allclose(c["logprobs"], ref.logprobs[0, : len(c["tokens"])], atol=1e-5)
    assert c["text"] == tok.decode(c["tokens"], skip_special_tokens=True) and c["finish_reason"] == "length"
    timing = data["timing"]
    assert timing["generated_tokens"] == 10 and timing["first_token_s"] > 0
    assert all(v is None or v == v for v in timing.values())  # never NaN
    assert "tokens/s" in err and "nan" not in err


def test_stop_string_cuts_the_text_and_names_the_stop(capsys):
    # The tiny model's greedy continuation of "hello world" is "uuuuuuuagagag".
    code, out, _ = run(capsys, "hello world", "-m", TINY, "-n", "10", "--json", "--stop", "ag", "--stop", "zz")
    (c,) = json.loads(out)["completions"]
    assert (c["text"], c["finish_reason"], c["stop"]) == ("uuuuuuu", "stop", "ag")
    assert len(c["tokens"]) == 8  # "ag" is one token: the row stopped right there
    code, out, _ = run(capsys, "hello world", "-m", TINY, "-n", "10", "--stop", "ag", "--keep-stop", "-q")
    assert out == "hello worlduuuuuuuag\n"
    # A stop string spanning two tokens ("u" "a") also cuts inside the streamed text.
    code, out, _ = run(capsys, "hello world", "-m", TINY, "-n", "10", "--stop", "uag", "-q")
    assert code == 0 and out == "hello worlduuuuuu\n"


def test_num_samples_print_each_sample_and_equal_the_library(capsys):
    args = ["Once upon", "-m", TINY, "-n", "6", "--temp", "1.5", "--num-samples", "3", "--seed", "4"]
    code, out, _ = run(capsys, *args)
    assert code == 0 and sorted(line for line in out.splitlines() if line.startswith("---")) == [
        "--- sample 0 ---", "--- sample 1 ---", "--- sample 2 ---"]
    code, out, _ = run(capsys, *args, "--json")
    data = json.loads(out)
    _, tok, ids, ref = _tiny_generate("Once upon", 6, temperature=1.5, num_samples=3, key=jax.random.key(4))
    assert [c["tokens"] for c in data["completions"]] == [
        ref.tokens[i, len(ids): int(ref.lengths[i])].tolist() for i in range(3)]
    assert len({tuple(c["tokens"]) for c in data["completions"]}) > 1


def test_beams_speculative_and_top_logprobs(capsys):
    model, tok = _load(TINY)
    ids = tok.encode("hello world")
    code, out, _ = run(capsys, "hello world", "-m", TINY, "-n", "6", "--beams", "3", "--num-samples", "2", "--json")
    data = json.loads(out)
    ref = jaxdecode.beam_search(model, jnp.array([ids]), 6, num_beams=3, num_return_sequences=2, eos_id=tok.eos_ids)
    for r, c in enumerate(data["completions"]):
        assert c["tokens"] == ref.tokens[0, r, len(ids): int(ref.lengths[0, r])].tolist()
        assert c["score"] == pytest.approx(float(ref.scores[0, r]), abs=1e-5)
    greedy = _tiny_generate("hello world", 6, temperature=0.0)[3].tokens[0, len(ids):].tolist()
    for mode in ("prompt-lookup", "draft:1"):
        code, out, _ = run(capsys, "hello world", "-m", TINY, "-n", "6", "--speculative", mode, "--json")
        (c,) = json.loads(out)["completions"]
        assert code == 0 and c["tokens"] == greedy and c["proposed"] >= c["accepted"] >= 0, mode
    code, out, _ = run(capsys, "hello world", "-m", TINY, "-n", "4", "--top-logprobs", "3", "--json")
    (c,) = json.loads(out)["completions"]
    assert len(c["top_logprobs"]) == 4
    for step, tok_id in zip(c["top_logprobs"], c["tokens"]):
        lps = [x["logprob"] for x in step]
        assert len(step) == 3 and lps == sorted(lps, reverse=True) and step[0]["id"] == tok_id  # greedy: the top


def test_decoders_reject_what_they_cannot_honour(capsys):
    code, _, err = run(capsys, "hello", "-m", TINY, "-n", "4", "--beams", "2", "--temp", "0.5")
    assert code == 2 and err.startswith("jaxdecode: error: --temp: jaxdecode.beam_search: `temperature` is not supported")
    code, _, err = run(capsys, "hello", "-m", TINY, "-n", "4", "--speculative", "prompt-lookup", "--repeat-penalty", "1.2")
    assert code == 2 and "--repeat-penalty: jaxdecode.generate: `repetition_penalty` is not supported" in err
    code, _, err = run(capsys, "hello", "-m", TINY, "-n", "40")  # 32 positions
    assert code == 2 and "exceeds the model's context of 32 tokens" in err and err.count("\n") == 1


def test_one_token_rate_is_never_nan_and_quiet_is_silent(capsys):
    code, _, err = run(capsys, "hello", "-m", TINY, "-n", "1")
    assert code == 0 and "1 tokens in" in err and "tokens/s overall" in err and "nan" not in err
    code, out, err = run(capsys, "hello", "-m", TINY, "-n", "3", "-q")
    assert code == 0 and err == "" and out.startswith("hello")


def test_ignore_eos_and_min_new_tokens_reach_the_library(capsys):
    # Force EOS (<|endoftext|> = 1) with a logit bias: the row stops after one token...
    code, out, _ = run(capsys, "hello", "-m", TINY, "-n", "5", "--logit-bias", "1+100", "--json")
    (c,) = json.loads(out)["completions"]
    assert c["tokens"] == [1] and (c["finish_reason"], c["stop"], c["text"]) == ("stop", 1, "")
    # ...unless EOS is ignored, or banned for the first tokens.
    code, out, _ = run(capsys, "hello", "-m", TINY, "-n", "5", "--logit-bias", "1+100", "--ignore-eos", "--json")
    assert json.loads(out)["completions"][0]["tokens"] == [1] * 5
    code, out, _ = run(capsys, "hello", "-m", TINY, "-n", "5", "--logit-bias", "1+100", "--min-new-tokens", "3", "--json")
    toks = json.loads(out)["completions"][0]["tokens"]
    assert len(toks) == 4 and toks[-1] == 1 and 1 not in toks[:3]


def test_prompt_from_stdin_file_and_flag(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world\n"))
    _, from_stdin, _ = run(capsys, "-m", TINY, "-n", "3", "-q")
    (tmp_path / "p.txt").write_text("hello world")
    _, from_file, _ = run(capsys, "-f", tmp_path / "p.txt", "-m", TINY, "-n", "3", "-q")
    _, from_flag, _ = run(capsys, "-p", "hello world", "-m", TINY, "-n", "3", "-q")
    assert from_stdin == from_file == from_flag and from_flag.startswith("hello world")


def test_chat_session_keeps_history_and_resets(chat_model, capsys, monkeypatch):
    model, tok = _load(chat_model)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhello\n/reset\nhello\n/exit\nnever read\n"))
    code, out, err = run(capsys, "-i", "-m", chat_model, "-n", "4", "-q")
    assert code == 0 and "/reset" in err and "(history cleared)" in err
    answers = out.split("\n")[:3]

    def answer(history):
        ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True))
        out = jaxdecode.generate(model, jnp.array([ids]), 4, temperature=0.0, eos_id=tok.eos_ids)
        return tok.decode(out.tokens[0, len(ids): int(out.lengths[0])], skip_special_tokens=True)

    a1 = answer([{"role": "user", "content": "hi"}])
    a2 = answer([{"role": "user", "content": "hi"}, {"role": "assistant", "content": a1},
                 {"role": "user", "content": "hello"}])
    a3 = answer([{"role": "user", "content": "hello"}])
    assert answers == [a1, a2, a3] and a2 != a3  # the second turn saw the first; /reset forgot it


def _greedy_answer(model, tok, history, n=4):
    """(prompt ids, generated ids, text) of a fresh greedy answer to ``history``."""
    ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True))
    out = jaxdecode.generate(model, jnp.array([ids]), n, temperature=0.0, eos_id=tok.eos_ids)
    gen = out.tokens[0, len(ids): int(out.lengths[0])].tolist()
    return ids, gen, tok.decode(gen, skip_special_tokens=True)


def _common_prefix(a, b):
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def test_chat_reuses_the_kv_cache_between_turns(chat_model, capsys, monkeypatch):
    model, tok = _load(chat_model)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhello\n/reset\nhello\n"))
    code, out, err = run(capsys, "-i", "-m", chat_model, "-n", "4")
    assert code == 0
    lines = [l for l in err.splitlines() if l.startswith("[jaxdecode] prefill")]
    assert len(lines) == 3, err
    u1, u2 = {"role": "user", "content": "hi"}, {"role": "user", "content": "hello"}
    ids1, gen1, a1 = _greedy_answer(model, tok, [u1])
    ids2, _, a2 = _greedy_answer(model, tok, [u1, {"role": "assistant", "content": a1}, u2])
    ids3, _, a3 = _greedy_answer(model, tok, [u2])
    assert out.split("\n")[:3] == [a1, a2, a3]
    # Turn 2 reuses the common prefix of its prompt and what the cache holds (turn 1's prompt
    # and answer but the answer's last token, which was never fed); /reset empties the slot.
    cached = (ids1 + gen1)[: len(ids1) + len(gen1) - 1]
    reused = _common_prefix(ids2[:-1], cached)
    assert reused >= len(ids1) - 1
    assert lines[0].startswith(f"[jaxdecode] prefill {len(ids1)} new tokens (0 reused) | first token ")
    assert lines[1].startswith(f"[jaxdecode] prefill {len(ids2) - reused} new tokens ({reused} reused) | ")
    assert lines[2].startswith(f"[jaxdecode] prefill {len(ids3)} new tokens (0 reused) | ")


@pytest.mark.parametrize("donated", [False, True])
def test_chat_ctrl_c_mid_answer_keeps_history_and_cache_consistent(chat_model, capsys, monkeypatch, donated):
    """Ctrl-C in turn 2's second chunk: the answer is dropped from the history; the slot's cache
    holds a partial answer (or, when the interrupt lands inside the call that donated the
    state, nothing): turn 3 equals a fresh answer to the history without turn 2."""
    from jaxdecode._engine import Engine

    model, tok = _load(chat_model)
    real, calls = Engine.decode, []

    def decode(self, state):
        calls.append(1)
        if len(calls) == 4:  # turn 1 takes 2 chunks (4 tokens, 2 per chunk); turn 2's second
            if donated:
                real(self, state)  # the state's buffers are gone, the result never returned
            raise KeyboardInterrupt
        return real(self, state)

    monkeypatch.setattr(Engine, "decode", decode)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhello\nyes\n"))
    code, out, err = run(capsys, "-i", "-m", chat_model, "-n", "4", "--chunk-size", "2")
    assert code == 0 and "(answer interrupted)" in err
    u1, u3 = {"role": "user", "content": "hi"}, {"role": "user", "content": "yes"}
    _, _, a1 = _greedy_answer(model, tok, [u1])
    ids3, _, a3 = _greedy_answer(model, tok, [u1, {"role": "assistant", "content": a1}, u3])
    texts = [l for l in out.split("\n") if l]
    assert texts[0] == a1 and texts[-1] == a3
    last = [l for l in err.splitlines() if l.startswith("[jaxdecode] prefill")][-1]
    reused = int(last.split("(")[1].split()[0])
    assert (reused == 0) if donated else (reused > 0), last


def test_chat_stop_strings_cut_each_answer_as_the_library(chat_model, capsys, monkeypatch):
    model, tok = _load(chat_model)
    u1, u2 = {"role": "user", "content": "hi"}, {"role": "user", "content": "hello"}
    _, gen1, a1 = _greedy_answer(model, tok, [u1], n=6)
    stop = tok.decode(gen1[2:3], skip_special_tokens=True)  # the third token's text
    assert stop.strip(), (gen1, a1)

    def answer(history):
        ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True))
        out = jaxdecode.generate(model, jnp.array([ids]), 6, temperature=0.0, eos_id=tok.eos_ids, stop=[stop],
                                 tokenizer=tok)
        return jaxdecode.completions(out, tok, stop=[stop], max_new_tokens=6)[0].text

    b1 = answer([u1])
    b2 = answer([u1, {"role": "assistant", "content": b1}, u2])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhello\n"))
    code, out, err = run(capsys, "-i", "-m", chat_model, "-n", "6", "--stop", stop)
    assert code == 0 and b1 == a1[: a1.index(stop)]
    assert out.split("\n")[:2] == [b1, b2] and "(0 reused)" not in err.splitlines()[-1]


def test_chat_context_size_and_engine_fallbacks(chat_model, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhello there hello there\nbye\n"))
    code, out, err = run(capsys, "-i", "-m", chat_model, "-n", "4", "-q", "--ctx-size", "20")
    assert code == 0 and "exceeds max_seq_len=20 tokens per slot. (/reset starts over; --ctx-size sets" in err
    code, _, err = run(capsys, "-i", "-m", chat_model, "--ctx-size", "64")
    assert code == 2 and err.startswith("jaxdecode: error: --ctx-size: ") and len(err.splitlines()) == 1
    code, _, err = run(capsys, "hi", "-m", chat_model, "--ctx-size", "16")
    assert code == 2 and "--ctx-size sizes the interactive chat's KV cache" in err
    # What the engine cannot do runs the chat through generate_stream (whole history each turn).
    args = _cli.build_parser().parse_args(["-i", "--num-samples", "2"])
    assert _cli._chat_engine_refusal(args) == "--num-samples"
    args = _cli.build_parser().parse_args(["-i"])
    assert _cli._chat_engine_refusal(args) is None  # every sampling knob runs on the engine
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhello\n"))
    code, out, err = run(capsys, "-i", "-m", chat_model, "-n", "4", "--num-samples", "2")
    assert code == 0 and "reused" not in err and err.count("first token") == 2


# ---------------------------------------------------------------------------------------
# Through the real entry point: a terminal, Ctrl-C, a closed pipe


def _pty_run(argv, tmp_path, until=None, then=None, timeout=120):
    """Runs `python -m jaxdecode argv` on a pseudo-terminal; returns (exit code, everything
    printed). When ``until`` shows up in the output, ``then(proc)`` is called once."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "jaxdecode", *argv], stdin=follower, stdout=follower,
                            stderr=follower, env=_env(tmp_path), cwd=ROOT, close_fds=True)
    os.close(follower)
    seen, deadline, fired = b"", time.time() + timeout, False
    while time.time() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                data = os.read(leader, 4096)
            except OSError:
                data = b""
            if not data:
                break
            seen += data
        if until and not fired and until in seen:
            fired = True
            then(proc)
        if proc.poll() is not None and not ready:
            break
    proc.wait(timeout=30)
    os.close(leader)
    return proc.returncode, seen.decode("utf-8", "replace")


def test_terminal_status_line_is_cleared_at_the_first_token(tmp_path):
    code, text = _pty_run(["hello world", "-m", TINY, "-n", "6"], tmp_path)
    assert code == 0, text
    assert "loading " in text and "compiling for batch 1, 6 tokens" in text
    # The status line is erased before the text starts.
    status_at = text.index("compiling for batch 1")
    assert text.index("\r\x1b[K", status_at) < text.index("hello world", status_at)
    assert "first token" in text and "Traceback" not in text


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    code, text = _pty_run(["hello world", "-m", TINY, "-n", "6"], tmp_path, until=b"compiling",
                          then=lambda p: p.send_signal(signal.SIGINT))
    assert code == 130, text
    assert "jaxdecode: interrupted" in text and "Traceback" not in text and "KeyboardInterrupt" not in text


def test_terminal_chat_streams_turns_and_reuses_the_cache(chat_model, tmp_path):
    """`jaxdecode --chat` with no prompt on a terminal: the prompt, two turns (the second
    prefilling only its new tokens), /exit."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "jaxdecode", "--chat", "-m", chat_model, "-n", "4"],
                            stdin=follower, stdout=follower, stderr=follower, env=_env(tmp_path), cwd=ROOT,
                            close_fds=True)
    os.close(follower)
    seen, deadline = b"", time.time() + 120
    # (what to wait for, how many times it must have appeared, what to type then)
    script = [(b"> ", 1, b"hi\n"), (b"reused)", 1, b"hello\n"), (b"reused)", 2, b"/exit\n")]
    while time.time() < deadline and proc.poll() is None:
        if select.select([leader], [], [], 0.2)[0]:
            try:
                seen += os.read(leader, 4096)
            except OSError:
                break
        if script and seen.count(script[0][0]) >= script[0][1]:
            os.write(leader, script.pop(0)[2])
    proc.wait(timeout=30)
    os.close(leader)
    text = seen.decode("utf-8", "replace")
    assert proc.returncode == 0 and not script, text
    assert "compiling for batch 1, 4 tokens" in text and "Traceback" not in text
    first, second = [l for l in text.splitlines() if "[jaxdecode] prefill" in l]
    assert "(0 reused)" in first and "(0 reused)" not in second, text


def test_closed_pipe_exits_quietly(tmp_path):
    # `jaxdecode ... | head -c 0`, deterministically: the reader is gone before the first write.
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "jaxdecode", "hello", "-m", TINY, "-n", "6", "--chunk-size", "2"],
                            stdout=write_end, stderr=subprocess.PIPE, env=_env(tmp_path), cwd=ROOT)
    os.close(write_end)
    os.close(read_end)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxdecode", "--help"], capture_output=True, text=True, timeout=120,
                          env=_env(tmp_path), cwd=ROOT)
    assert proc.returncode == 0 and "--max-new-tokens" in proc.stdout


# ---------------------------------------------------------------------------------------
# The embedded SmolLM2


@pytest.mark.slow
def test_default_model_greedy_stops_at_a_blank_line(capsys):
    code, out, err = run(capsys, "every effort moves you", "-n", "24", "--stop", "\\n\\n")
    assert code == 0 and out == "every effort moves you away from your friends.\n"
    assert "first token" in err
    code, out, _ = run(capsys, "every effort moves you", "-n", "24", "--stop", "\\n\\n", "--json")
    (c,) = json.loads(out)["completions"]
    model, tok = _load()
    ids = tok.encode("every effort moves you")
    ref = jaxdecode.generate(model, jnp.array([ids]), 24, temperature=0.0, stop="\n\n", tokenizer=tok)
    assert c["tokens"] == ref.tokens[0, len(ids): int(ref.lengths[0])].tolist()
    assert (c["text"], c["stop"]) == (" away from your friends.", "\n\n")


@pytest.mark.slow
def test_default_model_chat_from_stdin(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2+2?\n"))
    code, out, _ = run(capsys, "--chat", "--max-new-tokens", "4", "--json", "--system", "Be brief.")
    assert code == 0
    data = json.loads(out)
    model, tok = _load()
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                   system="Be brief.")
    assert data["prompt"] == chat
    ids = tok.encode(chat)
    ref = jaxdecode.generate(model, jnp.array([ids]), 4, temperature=0.0)
    (c,) = data["completions"]
    assert c["tokens"] == ref.tokens[0, len(ids): int(ref.lengths[0])].tolist() and c["text"].strip()
