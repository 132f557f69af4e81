"""Stop strings: the host table against brute force, in generate / generate_stream, the texts."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode
from jaxdecode import _stop

from fake_models import Bigram, PlusOne, cached

# A vocabulary whose greedy PlusOne walk from token 0 spells "User: hi\nr: x..." (token t+1
# follows token t).
VOCAB = ["<s>", "Us", "er", ":", " hi", "\n", "r: x", "U", "s", "e"]
PLUS = PlusOne(len(VOCAB))
CACHED_PLUS = cached(PLUS)


def first_stop(pieces: list[bytes], stops: list[str]) -> tuple[int, int]:
    """Brute force: (token index, stop index) of the first token whose end makes the text
    contain a stop string (earliest-ending occurrence; ties: lowest index); (-1, -1) if none."""
    text = b""
    for t, p in enumerate(pieces):
        seen = len(text)
        text += p
        best = None
        for k, s in enumerate(stops):
            sb = s.encode()
            # occurrences that end inside the new piece (not earlier: those would have fired)
            start = text.find(sb, max(0, seen - len(sb) + 1))
            if start >= 0:
                end = start + len(sb)
                if best is None or end < best[0]:
                    best = (end, k)
        if best is not None:
            return t, best[1]
    return -1, -1


def walk(table, ids):
    state = _stop.init_state(1)
    for t, tok in enumerate(ids):
        state = _stop.advance(table, state, jnp.array([tok]), jnp.array([True]))
        if int(state[0]) < 0:
            return t, int(_stop.fired(state)[0])
    return -1, -1


def test_table_matches_brute_force_on_random_vocabularies():
    rng = random.Random(0)
    alphabet = "ab\n:"
    for trial in range(30):
        vocab = [b""] + [("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))).encode()
                         for _ in range(15)]
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        table = jnp.asarray(_stop.build_table(stops, vocab))
        assert table.shape[0] % 16 == 0 and table.shape[1] == len(vocab)
        for _ in range(10):
            ids = [rng.randrange(len(vocab)) for _ in range(12)]
            assert walk(table, ids) == first_stop([vocab[i] for i in ids], stops), (vocab, stops, ids)


def test_multibyte_characters_split_across_tokens():
    vocab = [b"", "日".encode()[:1], "日".encode()[1:], b" x", "本".encode()]
    table = jnp.asarray(_stop.build_table(["日本"], vocab))
    assert walk(table, [3, 1, 2, 4]) == (3, 0)  # the stop's first character spans two tokens
    assert walk(table, [1, 2, 3, 4]) == (-1, -1)


@pytest.mark.parametrize("model", [PLUS, CACHED_PLUS], ids=["stateless", "cached"])
@pytest.mark.parametrize(
    "stop,steps,index",
    [
        ("er:", 3, 0),  # spans two tokens ("er", ":")
        ("User:", 3, 0),  # three tokens ("Us", "er", ":")
        (": h", 4, 0),  # ends inside " hi"
        ("i\nr", 6, 0),  # starts inside " hi", ends inside "r: x"
        (["nope", "\n"], 5, 1),  # the second string fires
    ],
)
def test_generate_stops_across_token_boundaries(model, stop, steps, index):
    out = jaxdecode.generate(model, jnp.array([[0]]), 9, temperature=0.0, stop=stop, tokenizer=VOCAB)
    assert out.num_generated.tolist() == [steps]
    assert out.tokens[0, 1 : 1 + steps].tolist() == list(range(1, steps + 1))
    assert out.stop_index.tolist() == [index]


def test_stop_in_the_prompt_does_not_stop():
    # The prompt spells "User:"; the generated text spells it again after wrapping around.
    prompt = jnp.array([[0, 1, 2, 3]])
    out = jaxdecode.generate(CACHED_PLUS, prompt, 12, temperature=0.0, stop="User:", tokenizer=VOCAB)
    gen = out.tokens[0, 4 : int(out.lengths[0])].tolist()
    assert gen == [4, 5, 6, 7, 8, 9, 0, 1, 2, 3] and out.stop_index.tolist() == [0]
    # Nor does one straddling the prompt's end (the prompt ends "Us", the model writes "er:").
    out = jaxdecode.generate(CACHED_PLUS, jnp.array([[0, 1]]), 3, temperature=0.0, stop="User:", tokenizer=VOCAB)
    assert out.num_generated.tolist() == [3] and out.stop_index.tolist() == [-1]


def test_per_row_and_sampled_rows_equal_the_truncated_run_without_stops():
    """Random text from a bigram model: with stop strings, each row is the run without them
    cut at the brute-force first stop (same keys, so the same draws)."""
    rng = random.Random(1)
    vocab = [b""] + [("".join(rng.choice("ab :\n") for _ in range(rng.randint(1, 3)))).encode() for _ in range(23)]
    model = cached(Bigram.random(len(vocab), seed=3, scale=0.5))
    stops = ["a:", "b\nb", " ab "]
    prompt = jnp.array([[1, 2, 3], [4, 5, 0], [6, 0, 0], [7, 8, 9]])
    lengths = jnp.array([3, 2, 1, 3])
    kw = dict(key=jax.random.key(7), temperature=1.0, prompt_lengths=lengths, eos_id=())
    free = jaxdecode.generate(model, prompt, 40, **kw)
    out = jaxdecode.generate(model, prompt, 40, stop=stops, tokenizer=vocab, **kw)
    fired = 0
    for b in range(4):
        ln = int(lengths[b])
        gen = free.tokens[b, ln : ln + 40].tolist()
        t, k = first_stop([vocab[i] for i in gen], stops)
        n = 40 if t < 0 else t + 1
        fired += t >= 0
        assert int(out.num_generated[b]) == n and int(out.stop_index[b]) == k
        assert out.tokens[b, ln : ln + n].tolist() == gen[:n]
        np.testing.assert_allclose(out.logprobs[b, :n], free.logprobs[b, :n], rtol=1e-6)
    assert fired >= 2  # the test exercises stopping rows next to running ones
    # The stream yields the same tokens and the same stop indices.
    chunks = list(jaxdecode.generate_stream(model, prompt, 40, chunk_size=7, stop=stops, tokenizer=vocab, **kw))
    toks = np.concatenate([np.asarray(c.tokens) for c in chunks], axis=1)
    for b in range(4):
        n = int(out.num_generated[b])
        assert toks[b, :n].tolist() == out.tokens[b, int(lengths[b]) : int(lengths[b]) + n].tolist()
    assert chunks[-1].stop_index.tolist() == out.stop_index.tolist()


def test_completions_cut_or_keep_the_stop_string():
    out = jaxdecode.generate(PLUS, jnp.array([[0], [6]]), 9, temperature=0.0, stop=[": h", "U"], tokenizer=VOCAB)
    # Row 0: "Us" "er" ":" " hi" -> "User: hi" contains "U" first (ends earliest).
    # Row 1 starts at "r: x": "U" "s" "e" "<s>" ... -> "U" in its first token.
    c = jaxdecode.completions(out, VOCAB, stop=[": h", "U"])
    assert [x.text for x in c] == ["", ""] and [x.stop for x in c] == ["U", "U"]
    out = jaxdecode.generate(PLUS, jnp.array([[0]]), 9, temperature=0.0, stop=[": h"], tokenizer=VOCAB)
    (c,) = jaxdecode.completions(out, VOCAB, stop=[": h"])
    assert c == jaxdecode.Completion("User", [1, 2, 3, 4], "stop", ": h")
    (k,) = jaxdecode.completions(out, VOCAB, stop=[": h"], keep_stop=True)
    assert k.text == "User: h"
    out = jaxdecode.generate(PLUS, jnp.array([[0]]), 3, temperature=0.0, stop=["zz"], tokenizer=VOCAB)
    (c,) = jaxdecode.completions(out, VOCAB, stop=["zz"])
    assert (c.text, c.finish_reason, c.stop) == ("User:", "length", None)
    out = jaxdecode.generate(PLUS, jnp.array([[7]]), 5, temperature=0.0, eos_id=0)
    (c,) = jaxdecode.completions(out, VOCAB, eos_ids=[0])
    assert (c.text, c.tokens, c.finish_reason, c.stop) == ("se", [8, 9, 0], "stop", 0)


def test_text_stopper_streams_any_split_like_the_whole_text():
    rng = random.Random(2)
    stops = ["\nUser:", "###", "ab"]
    for _ in range(200):
        text = "".join(rng.choice(["a", "b", "\n", "User:", "#", "x ", "Us"]) for _ in range(rng.randint(0, 12)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        for keep in (False, True):
            s = _stop.TextStopper(stops, keep=keep)
            sent = "".join(s.push(p) for p in pieces) + s.finish()
            want, k = _stop.cut(text, stops, keep=keep)
            assert sent == want == s.text and s.stopped == k, (text, pieces)


def test_bad_stop_arguments():
    with pytest.raises(ValueError, match=r"jaxdecode.generate: `stop` strings need `tokenizer=`"):
        jaxdecode.generate(PLUS, jnp.array([[0]]), 3, temperature=0.0, stop="x")
    with pytest.raises(TypeError, match=r"jaxdecode.SamplingParams: `stop\[1\]` must be a string, got 13"):
        jaxdecode.SamplingParams(stop=["x", 13])
    with pytest.raises(ValueError, match=r"jaxdecode.generate_stream: `stop\[0\]` is the empty string"):
        jaxdecode.generate_stream(PLUS, jnp.array([[0]]), 3, temperature=0.0, stop=[""], tokenizer=VOCAB)
    with pytest.raises(TypeError, match=r"`tokenizer` must have a token_bytes\(\) method"):
        jaxdecode.generate(PLUS, jnp.array([[0]]), 3, temperature=0.0, stop="x", tokenizer=object())
    with pytest.raises(ValueError, match=r"jaxdecode.beam_search: `stop` is not supported"):
        jaxdecode.beam_search(CACHED_PLUS, jnp.array([[0]]), 3, num_beams=2,
                              sampling=jaxdecode.SamplingParams(stop="x"))
    with pytest.raises(ValueError, match=r"`stop` is not supported with `speculative` decoding"):
        jaxdecode.generate(CACHED_PLUS, jnp.array([[0]]), 3, temperature=0.0, stop="x", tokenizer=VOCAB,
                           speculative=jaxdecode.prompt_lookup(num_tokens=2, ngram=1))


def test_sampling_params_with_stop_is_a_pytree():
    params = jaxdecode.SamplingParams(temperature=0.5, stop="\n")
    assert params.stop == ("\n",)
    leaves, tree = jax.tree_util.tree_flatten(params)
    assert "\n" not in leaves  # the strings are static aux data, not traced leaves
    again = jax.tree_util.tree_unflatten(tree, leaves)
    assert again.stop == ("\n",) and again.temperature == 0.5
    out = jax.jit(lambda p: p.temperature * 2)(params)
    assert float(out) == 1.0


def test_real_tokenizer_bytes_join_to_the_decoded_text():
    _, tok = jaxdecode.models.load()
    text = "Hello world!\n\nUser: héllo 日本語 --- ok"
    ids = tok.encode(text + "<|im_end|>")
    pieces = tok.token_bytes()
    assert len(pieces) == tok.vocab_size
    assert b"".join(pieces[i] for i in ids).decode() == text == tok.decode(ids, skip_special_tokens=True)


def test_stop_module_is_floor_two():
    """_stop imports only the validation layer, so the server and the decoders can share it."""
    from test_core import import_graph

    graph = import_graph()
    assert graph["jaxdecode._stop"] <= {"jaxdecode._validate"}, graph["jaxdecode._stop"]
    assert "jaxdecode._stop" in graph["jaxdecode._generate"] and "jaxdecode._stop" in graph["jaxdecode._settings"]
