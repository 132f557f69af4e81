"""jaxdecode.generate / generate_stream with weight-free fake models (tests/fake_models.py).

Compiles dominate the run time (~2-3 s each on CPU), so tests share a few compiled shapes:
B=4 rows, padded prompt length P=6, N=8 new tokens, V=16.
"""

from __future__ import annotations

import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import jaxdecode
from jaxdecode import _generate as G

from fake_models import BIG, Bigram, Constant, ContextProbe, PlusOne, cached, greedy_reference

V, B, P, N = 16, 4, 6, 8
ROOT = pathlib.Path(__file__).resolve().parents[1]

PROMPT = np.array([[1, 2, 3, 4, 5, 6], [3, 4, 5, 0, 0, 0], [14, 0, 0, 0, 0, 0], [9, 9, 10, 11, 0, 0]], np.int32)
LENGTHS = np.array([6, 3, 1, 4], np.int32)

PLUS = PlusOne(V)
PLUS_CACHED = cached(PLUS)
BIGRAM = Bigram.random(V, seed=0)
BIGRAM_CACHED = cached(BIGRAM)
MODELS = {"stateless": (PLUS, BIGRAM), "cached": (PLUS_CACHED, BIGRAM_CACHED)}


def _expected_plus_one(prompt, lengths, n, pad=0, eos=()):
    out = np.full((len(prompt), prompt.shape[1] + n), pad, np.int32)
    for b, (row, ln) in enumerate(zip(prompt, lengths)):
        seq = list(row[:ln])
        for _ in range(n):
            seq.append((seq[-1] + 1) % V)
            if seq[-1] in eos:
                break
        out[b, : len(seq)] = seq
    return out


# ---------------------------------------------------------------------------------------
# Exact greedy outputs, both protocols


@pytest.mark.parametrize("protocol", ["stateless", "cached"])
def test_greedy_plus_one_exact_ragged(protocol):
    model = MODELS[protocol][0]
    out = jaxdecode.generate(model, PROMPT, N, temperature=0.0, prompt_lengths=LENGTHS)
    chex.assert_shape(out.tokens, (B, P + N))
    chex.assert_shape((out.logprobs, out.raw_logprobs), (B, N))
    assert out.tokens.dtype == jnp.int32 and out.lengths.dtype == jnp.int32
    np.testing.assert_array_equal(out.tokens, _expected_plus_one(PROMPT, LENGTHS, N))
    np.testing.assert_array_equal(out.lengths, LENGTHS + N)
    np.testing.assert_array_equal(out.num_generated, np.full(B, N))
    np.testing.assert_allclose(out.logprobs, PLUS.greedy_logprob(), atol=1e-6)
    np.testing.assert_allclose(out.raw_logprobs, PLUS.greedy_logprob(), atol=1e-6)
    # Same as a plain Python greedy loop on the unpadded prefixes.
    ref = greedy_reference(PLUS, PROMPT, LENGTHS, N)
    for b in range(B):
        assert out.tokens[b, : out.lengths[b]].tolist() == ref[b]


@pytest.mark.parametrize("protocol", ["stateless", "cached"])
def test_eos_pad_and_all_done(protocol):
    model = MODELS[protocol][0]
    out = jaxdecode.generate(model, PROMPT, N, temperature=0.0, prompt_lengths=LENGTHS, eos_id=[9, 15], pad_id=13)
    expected = _expected_plus_one(PROMPT, LENGTHS, N, pad=13, eos=(9, 15))
    np.testing.assert_array_equal(out.tokens, expected)
    # rows: ...6 -> 7 8 9 | ...5 -> 6 7 8 9 | 14 -> 15 | ...11 -> 12 13 14 15
    np.testing.assert_array_equal(out.num_generated, [3, 4, 1, 4])
    np.testing.assert_array_equal(out.lengths, LENGTHS + [3, 4, 1, 4])
    steps = np.arange(N)[None, :]
    alive = steps < np.asarray(out.num_generated)[:, None]
    np.testing.assert_array_equal(np.asarray(out.logprobs) != 0, alive)
    np.testing.assert_array_equal(np.asarray(out.raw_logprobs) != 0, alive)


def test_min_new_tokens_bans_eos_per_row():
    out = jaxdecode.generate(PLUS, PROMPT, N, temperature=0.0, prompt_lengths=LENGTHS, eos_id=[9, 15],
                             min_new_tokens=np.array([0, 5, 0, 0]))
    # Row 1 (...5) would emit 9 as its 4th token; banned until 5 tokens, the greedy fallback is
    # token 0 (all other logits tie at 0), then 1, 2, ...; it never meets 9 or 15 again.
    assert out.tokens[1, 3:].tolist() == [6, 7, 8, 0, 1, 2, 3, 4, 0, 0, 0]
    np.testing.assert_array_equal(out.num_generated, [3, 8, 1, 4])


def test_model_skipped_once_all_rows_done():
    calls = []

    class Counting(PlusOne):
        def __call__(self, tokens):
            jax.debug.callback(lambda: calls.append(1))
            return super().__call__(tokens)

    out = jaxdecode.generate(Counting(V), PROMPT, N, temperature=0.0, prompt_lengths=LENGTHS, eos_id=[9, 15])
    jax.block_until_ready(out)
    # 1 initial call + one per step while some row is alive, except after the last step:
    # every row is done after step 3 (0-based), so steps 0..2 call the model.
    assert len(calls) == 1 + 3
    np.testing.assert_array_equal(out.num_generated, [3, 4, 1, 4])


def test_stop_sequences():
    prompt = PROMPT.copy()
    prompt[2, 0] = 7  # row 2: [7] -> 8 9 ... 12 (the [7, 8] across prompt/generation does not stop)
    out = jaxdecode.generate(PLUS, prompt, N, temperature=0.0, prompt_lengths=LENGTHS,
                             stop_sequences=[[7, 8], [12]])
    assert out.tokens[0, 6:].tolist() == [7, 8] + [0] * 6
    assert out.tokens[1, 3:].tolist() == [6, 7, 8] + [0] * 8
    assert out.tokens[2, 1:].tolist() == [8, 9, 10, 11, 12] + [0] * 8
    assert out.tokens[3, 4:].tolist() == [12] + [0] * 9
    np.testing.assert_array_equal(out.num_generated, [2, 3, 5, 1])


# ---------------------------------------------------------------------------------------
# Context windows (stateless protocol)


def _window_reference(model, prompt, lengths, n, context_size):
    out = []
    for row, ln in zip(prompt, lengths):
        seq = list(row[:ln])
        for _ in range(n):
            window = seq[-context_size:] if context_size else seq
            seq.append(int(np.argmax(np.asarray(model(jnp.asarray([window])))[0, -1])))
        out.append(seq)
    return out


@pytest.mark.parametrize("mode,context_size", [("length", 3), ("length", None), ("length", 100), ("first", 3)])
def test_context_window(mode, context_size):
    model = ContextProbe(V, mode)
    out = jaxdecode.generate(model, PROMPT, N, temperature=0.0, prompt_lengths=LENGTHS, context_size=context_size)
    ref = _window_reference(model, PROMPT, LENGTHS, N, context_size)
    for b in range(B):
        assert out.tokens[b, : out.lengths[b]].tolist() == ref[b]
    if mode == "length" and context_size == 3:  # the model sees min(length, 3) tokens
        assert out.tokens[2, 1:9].tolist() == [1, 2, 3, 3, 3, 3, 3, 3]
        assert out.tokens[0, 6:].tolist() == [3] * N


def test_context_size_attribute_is_used():
    class WithContext(ContextProbe):
        context_size = 3

    def window(model, **kw):  # the static window length generate would compile for
        return G._prepare("test", model, PROMPT, N, key=None, sampling=jaxdecode.SamplingParams(temperature=0.0),
                          prompt_lengths=None, pad_id=0, processors=None, **kw)[0].window

    assert window(WithContext(V), context_size=None) == 3
    assert window(WithContext(V), context_size=5) == 5  # the argument wins
    assert window(ContextProbe(V), context_size=None) == P + N  # unlimited: the whole buffer
    # KV cache slots: the prompt bucket (8 for this 6-token prompt) + the step bucket (16) - 1,
    # clipped to context_size.
    assert G.bucket(PROMPT.shape[1], *G.PROMPT_BUCKETS) == 8
    assert window(PLUS_CACHED, context_size=None) == 8 + 16 - 1
    assert window(PLUS_CACHED, context_size=P + N - 1) == P + N - 1


# ---------------------------------------------------------------------------------------
# Sampling statistics and log-probabilities


def _truncated_probs(logits, temperature, top_k=0, top_p=1.0):
    l = np.asarray(logits, np.float64) / temperature
    keep = np.ones_like(l, bool)
    if top_k:
        keep &= l >= np.sort(l)[::-1][top_k - 1]
    p = np.where(keep, np.exp(l - l.max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        n_keep = int(np.searchsorted(cum, top_p) + 1)
        mask = np.zeros_like(keep)
        mask[order[:n_keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("knobs", [dict(temperature=0.8), dict(temperature=1.3, top_k=6, top_p=0.9)])
def test_first_token_distribution_chi_square(knobs):
    rows, first = 20000, 3
    prompt = np.full((rows, 1), first, np.int32)
    out = jaxdecode.generate(BIGRAM, prompt, 1, key=jax.random.key(1234), **knobs)
    probs = _truncated_probs(np.asarray(BIGRAM.table[first]), knobs["temperature"], knobs.get("top_k", 0),
                             knobs.get("top_p", 1.0))
    drawn = np.asarray(out.tokens[:, 1])
    counts = np.bincount(drawn, minlength=V)
    assert np.all(counts[probs == 0] == 0)
    support = probs > 0
    _, pvalue = scipy.stats.chisquare(counts[support], rows * probs[support])
    assert pvalue > 1e-3, (counts, rows * probs)
    # Each token's log-probability is the one of the distribution it was drawn from.
    np.testing.assert_allclose(out.logprobs[:, 0], np.log(probs[drawn]), rtol=1e-4, atol=1e-5)
    raw = np.asarray(jax.nn.log_softmax(BIGRAM.table[first]))
    np.testing.assert_allclose(out.raw_logprobs[:, 0], raw[drawn], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Per-row keys and knobs, ragged prompts: a row equals that prompt run alone

RAGGED = np.array([[1, 2, 3, 4, 5, 6], [3, 4, 5, 0, 0, 0], [7, 7, 8, 1, 2, 9], [15, 2, 11, 0, 0, 0]], np.int32)
RAGGED_LENGTHS = np.array([6, 3, 6, 3], np.int32)
KNOBS = dict(temperature=np.array([1.0, 0.0, 0.7, 1.3], np.float32), top_p=0.95, min_p=np.array([0.0, 0, 0.05, 0]),
             repetition_penalty=1.2, presence_penalty=np.array([0.3, 0.0, 0.5, 0.1]), frequency_penalty=0.2,
             eos_id=2)


@pytest.mark.parametrize("protocol", ["stateless", "cached"])
def test_row_equals_prompt_run_alone(protocol):
    model = MODELS[protocol][1]
    keys = jax.random.split(jax.random.key(7), B)
    out = jaxdecode.generate(model, RAGGED, N, key=keys, prompt_lengths=RAGGED_LENGTHS, **KNOBS)
    again = jaxdecode.generate(model, RAGGED, N, key=keys, prompt_lengths=RAGGED_LENGTHS, **KNOBS)
    chex.assert_trees_all_equal(out, again)  # bit-identical
    assert int(out.num_generated.min()) >= 1
    for i in range(B):
        ln = int(RAGGED_LENGTHS[i])
        row_knobs = {k: (v[i] if np.ndim(v) else v) for k, v in KNOBS.items()}
        alone = jaxdecode.generate(model, RAGGED[i : i + 1, :ln], N, key=keys[i : i + 1], **row_knobs)
        np.testing.assert_array_equal(out.tokens[i, : ln + N], alone.tokens[0])
        np.testing.assert_array_equal(out.logprobs[i], alone.logprobs[0])
        np.testing.assert_array_equal(out.raw_logprobs[i], alone.raw_logprobs[0])
        assert int(out.lengths[i]) == int(alone.lengths[0])
    if protocol == "cached":  # and the KV-cached protocol equals the stateless one
        ref = jaxdecode.generate(MODELS["stateless"][1], RAGGED, N, key=keys, prompt_lengths=RAGGED_LENGTHS, **KNOBS)
        chex.assert_trees_all_close(out, ref, rtol=1e-6)
        np.testing.assert_array_equal(out.tokens, ref.tokens)


def test_single_key_is_split_into_row_keys():
    key = jax.random.key(3)
    out = jaxdecode.generate(BIGRAM, RAGGED, N, key=key, prompt_lengths=RAGGED_LENGTHS, **KNOBS)
    rows = jaxdecode.generate(BIGRAM, RAGGED, N, key=jax.random.split(key, B), prompt_lengths=RAGGED_LENGTHS, **KNOBS)
    chex.assert_trees_all_equal(out, rows)
    raw = jaxdecode.generate(BIGRAM, RAGGED, N, key=jax.random.PRNGKey(3), prompt_lengths=RAGGED_LENGTHS, **KNOBS)
    chex.assert_trees_all_equal(out, raw)


def test_no_recompilation_across_traced_arguments():
    base = dict(prompt_lengths=RAGGED_LENGTHS, **KNOBS)
    jax.block_until_ready(jaxdecode.generate(BIGRAM, RAGGED, N, key=jax.random.key(0), **base))
    size = G._generate_jit._cache_size()
    other_table = Bigram.random(V, seed=5)
    variants = [
        dict(temperature=0.5),
        dict(temperature=np.array([0.1, 0.2, 0.0, 2.0])),
        dict(top_k=3),
        dict(top_k=np.array([1, 2, 3, 0])),
        dict(top_p=0.5, min_p=0.1),
        dict(typical_p=0.7),
        dict(repetition_penalty=np.array([1.0, 1.5, 2.0, 0.5]), presence_penalty=-0.5, frequency_penalty=1.0),
        dict(key=jax.random.key(99)),
        dict(key=jax.random.split(jax.random.key(5), B)),
        dict(key=jax.random.PRNGKey(1)),
        dict(eos_id=7),
        dict(eos_id=[11]),
        dict(prompt=RAGGED[::-1].copy()),
        dict(prompt_lengths=np.array([1, 2, 5, 6])),
        dict(prompt_lengths=None),
        dict(min_new_tokens=np.array([0, 3, 8, 1])),
        dict(pad_id=5),
        dict(model=other_table),
        dict(temperature=0.0, key=None),
    ]
    outputs = set()
    for v in variants:
        args = dict(base, key=jax.random.key(0))
        args.update(v)
        model, prompt = args.pop("model", BIGRAM), args.pop("prompt", RAGGED)
        out = jaxdecode.generate(model, prompt, N, **args)
        outputs.add(np.asarray(out.tokens).tobytes())
    assert G._generate_jit._cache_size() == size
    assert len(outputs) > len(variants) // 2  # the traced values really changed the result


# ---------------------------------------------------------------------------------------
# Penalties, bias, min_new_tokens, processors: order and exact flips


CONST_LOGITS = np.zeros(V, np.float32)
CONST_LOGITS[[5, 9, 2, 12]] = [3.0, 2.8, 2.4, 1.0]
CONST = Constant(jnp.asarray(CONST_LOGITS))


def _penalized_greedy(prompt, length, n, rep=1.0, freq=0.0, pres=0.0, bias=None, eos=None, min_new=0):
    """NumPy reference: vLLM order (repetition, frequency/presence, bias, EOS ban), greedy."""
    seen = np.zeros(V, bool)
    seen[prompt[:length]] = True
    counts = np.zeros(V)
    out = []
    for step in range(n):
        l = CONST_LOGITS.astype(np.float64).copy()
        rep_seen = seen | (counts > 0)
        l = np.where(rep_seen, np.where(l > 0, l / rep, l * rep), l)
        l = l - freq * counts - pres * (counts > 0)
        if bias is not None:
            l = l + bias
        if eos is not None and step < min_new:
            l[eos] = -np.inf
        tok = int(np.argmax(l))
        out.append(tok)
        counts[tok] += 1
        if tok == eos:
            break
    return out


@pytest.mark.parametrize(
    "rows",
    [
        # (repetition, frequency, presence, bias token or None, min_new)
        [(1.0, 0.0, 0.0, None, 0), (1.2, 0.0, 0.0, None, 0), (1.0, 0.0, 0.5, None, 0), (1.0, 0.35, 0.0, None, 0)],
        [(1.0, 0.0, 0.0, 2, 0), (1.0, 0.0, 0.0, None, 3), (1.3, 0.2, 0.1, 12, 0), (0.8, 0.0, -0.2, 9, 2)],
    ],
)
def test_penalties_bias_min_new_tokens_match_reference(rows):
    prompt = np.array([[5, 1, 1, 0, 0, 0], [5, 0, 0, 0, 0, 0], [3, 4, 0, 0, 0, 0], [1, 2, 3, 4, 6, 7]], np.int32)
    lengths = np.array([3, 1, 2, 6])
    rep, freq, pres, bias_tok, min_new = (np.array(c) for c in zip(*rows))
    bias = np.zeros((B, V), np.float32)
    for b, t in enumerate(bias_tok):
        if t is not None:
            bias[b, t] = 0.7
    eos = 5
    out = jaxdecode.generate(CONST, prompt, N, temperature=0.0, prompt_lengths=lengths, repetition_penalty=rep,
                             frequency_penalty=freq, presence_penalty=pres, logit_bias=bias, eos_id=eos,
                             min_new_tokens=min_new.astype(np.int64))
    for b in range(B):
        ref = _penalized_greedy(prompt[b], lengths[b], N, rep[b], freq[b], pres[b], bias[b], eos, min_new[b])
        got = out.tokens[b, lengths[b] : lengths[b] + out.num_generated[b]].tolist()
        assert got == ref, (b, got, ref)
    if rows[1][0] == 1.2:  # known flips: repetition (5 in the prompt) and frequency penalties
        assert out.tokens[1, 1:3].tolist() == [9, 5]
        assert out.num_generated[0] == 1  # row 0 takes 5 = EOS at once


def test_processors_run_after_builtins_with_state():
    def init(ctx):
        return jnp.zeros((), jnp.int32)

    def update(logits, count, ctx):  # boost token `count` (the step count, from its own state)
        boost = jnp.where(jnp.arange(V) == count, 2 * BIG, 0.0)
        return logits + boost, count + 1

    boost = jaxdecode.LogitsProcessor(init, update)
    ban = jaxdecode.ban_tokens([2])
    out = jaxdecode.generate(PLUS, PROMPT, N, temperature=0.0, prompt_lengths=LENGTHS, processors=[boost, ban])
    # step s boosts token s; token 2 is banned after the boost (ties at 0 then pick 0).
    for b in range(B):
        assert out.tokens[b, LENGTHS[b] :].tolist()[:N] == [0, 1, 0, 3, 4, 5, 6, 7]


# ---------------------------------------------------------------------------------------
# Transformations: vmap, user jit, streaming


def test_vmap_over_prompts_equals_batched_call():
    keys = jax.random.split(jax.random.key(11), B)
    knobs = dict(temperature=0.9, top_k=8, eos_id=2, repetition_penalty=1.2)

    def one(prompt, key, length):
        out = jaxdecode.generate(BIGRAM, prompt[None], N, key=key[None], prompt_lengths=length[None], **knobs)
        return out.tokens[0], out.logprobs[0]

    tokens, logprobs = jax.vmap(one)(jnp.asarray(RAGGED), keys, jnp.asarray(RAGGED_LENGTHS))
    batched = jaxdecode.generate(BIGRAM, RAGGED, N, key=keys, prompt_lengths=RAGGED_LENGTHS, **knobs)
    np.testing.assert_array_equal(tokens, batched.tokens)
    np.testing.assert_allclose(logprobs, batched.logprobs, rtol=1e-6)


def test_inside_user_jit():
    @jax.jit
    def run(prompt, lengths, key, temperature, params):
        return jaxdecode.generate(Bigram(params), prompt, N, key=key, temperature=temperature,
                                  prompt_lengths=lengths, eos_id=2, repetition_penalty=1.2)

    key = jax.random.key(2)
    got = run(jnp.asarray(RAGGED), jnp.asarray(RAGGED_LENGTHS), key, jnp.float32(0.9), BIGRAM.table)
    ref = jaxdecode.generate(BIGRAM, RAGGED, N, key=key, temperature=0.9, prompt_lengths=RAGGED_LENGTHS, eos_id=2,
                             repetition_penalty=1.2)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-6)

    # Greedy without a key inside jit, then eagerly (nothing traced may leak between them).
    greedy = jax.jit(lambda p: jaxdecode.generate(PLUS, p, N, temperature=0.0, prompt_lengths=LENGTHS).tokens)
    np.testing.assert_array_equal(greedy(jnp.asarray(PROMPT)), _expected_plus_one(PROMPT, LENGTHS, N))
    out = jaxdecode.generate(PLUS, PROMPT, N, temperature=0.0, prompt_lengths=LENGTHS)
    np.testing.assert_array_equal(out.tokens, _expected_plus_one(PROMPT, LENGTHS, N))


def _stream_concat(chunks):
    toks = np.concatenate([np.asarray(c.tokens) for c in chunks], axis=1)
    lps = np.concatenate([np.asarray(c.logprobs) for c in chunks], axis=1)
    return toks, lps


@pytest.mark.parametrize("eos_id", [2, 12])
def test_stream_equals_generate(eos_id):
    keys = jax.random.split(jax.random.key(4), B)
    args = dict(key=keys, prompt_lengths=RAGGED_LENGTHS, **dict(KNOBS, eos_id=eos_id))
    ref = jaxdecode.generate(BIGRAM, RAGGED, N, **args)
    before = G._stream_chunk_jit._cache_size()
    chunks = list(jaxdecode.generate_stream(BIGRAM, RAGGED, N, chunk_size=3, **args))
    assert [c.tokens.shape[1] for c in chunks][:2] == [3, 3][: len(chunks)]
    toks, lps = _stream_concat(chunks)
    done = np.asarray(chunks[-1].done)
    ng = np.asarray(ref.num_generated)
    for b in range(B):
        ln = RAGGED_LENGTHS[b]
        np.testing.assert_array_equal(toks[b, : ng[b]], ref.tokens[b, ln : ln + ng[b]])
        assert np.all(toks[b, ng[b] :] == 0)
        np.testing.assert_array_equal(lps[b], np.asarray(ref.logprobs[b, : lps.shape[1]]))
    assert np.all(ref.logprobs[:, toks.shape[1] :] == 0)  # stopped early only when every row was done
    finished = np.asarray(ref.tokens)[np.arange(B), np.asarray(ref.lengths) - 1] == eos_id
    np.testing.assert_array_equal(done, finished & (ng > 0))
    if eos_id == 2:
        assert G._stream_chunk_jit._cache_size() - before <= 1  # one compile for every chunk


def test_stream_stops_early_when_all_done():
    chunks = list(jaxdecode.generate_stream(PLUS, PROMPT, N, chunk_size=3, temperature=0.0, prompt_lengths=LENGTHS,
                                            eos_id=[9, 15]))
    assert len(chunks) == 2 and bool(np.all(chunks[-1].done))
    toks, _ = _stream_concat(chunks)
    assert toks[:, :4].tolist() == [[7, 8, 9, 0], [6, 7, 8, 9], [15, 0, 0, 0], [12, 13, 14, 15]]


# ---------------------------------------------------------------------------------------
# Real pytree models: Flax NNX and jaxdecode.models.Decoder (GPT-2 switches)


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flax_nnx_module_and_example():
    pytest.importorskip("flax")
    from flax import nnx

    example = _load_example("flax_nnx_model")
    results = example.main()  # runs the example end to end
    model = results["model"]
    prompt, lengths = np.array([[5, 6, 7, 8], [9, 10, 0, 0]]), np.array([4, 2])
    # Greedy reference: the module on the fixed window, argmax at each row's last token.
    buf = np.zeros((2, 4 + 10), np.int32)
    buf[:, :4] = prompt
    cur = lengths.copy()
    forward = jax.jit(lambda m, t: m(t))
    for _ in range(10):
        logits = np.asarray(forward(model, jnp.asarray(buf)))
        for b in range(2):
            buf[b, cur[b]] = int(np.argmax(logits[b, cur[b] - 1]))
        cur += 1
    buf[1, 12:] = 0
    np.testing.assert_array_equal(results["greedy"].tokens, buf)
    # New params of the same shapes reuse the compiled loop.
    size = G._generate_jit._cache_size()
    other = example.TinyLM(rngs=nnx.Rngs(7))
    out = jaxdecode.generate(other, prompt, 10, temperature=0.0, prompt_lengths=lengths)
    assert G._generate_jit._cache_size() == size
    assert out.tokens.tolist() != results["greedy"].tokens.tolist()


def test_gpt2_kv_cached_equals_stateless():
    from jaxdecode.models import Decoder, gpt2_config

    model = Decoder.init(jax.random.key(0), gpt2_config(vocab_size=V, max_seq_len=P + N, dim=16, n_layers=1, n_heads=2))
    model = jax.tree_util.tree_map(lambda a: a * 20.0 if a.ndim == 2 else a, model)  # peaky logits
    cached_out = jaxdecode.generate(model, RAGGED, N, temperature=0.0, prompt_lengths=RAGGED_LENGTHS)
    stateless_out = jaxdecode.generate(lambda t: model(t), RAGGED, N, temperature=0.0, prompt_lengths=RAGGED_LENGTHS)
    np.testing.assert_array_equal(cached_out.tokens, stateless_out.tokens)
    np.testing.assert_allclose(cached_out.logprobs, stateless_out.logprobs, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Bad input


def _bad_shape_model(tokens):
    return jnp.zeros(tokens.shape + (V,))[:, :-1]


def _bad_rank_model(tokens):
    return jnp.zeros((tokens.shape[0], V))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(prompt=np.arange(6)), ValueError, r"`prompt` must have shape \[batch, prompt_len\].*\(6,\)"),
        (dict(prompt=PROMPT.astype(np.float32)), TypeError, r"`prompt` must hold integer.*float32"),
        (dict(prompt=PROMPT + 10), ValueError, r"`prompt` has token id 16 at \[0, 5\], outside .* \[0, 16\)"),
        (dict(max_new_tokens=0), ValueError, r"`max_new_tokens` must be >= 1, got 0"),
        (dict(max_new_tokens=2.5), TypeError, r"`max_new_tokens` must be an int, got 2.5"),
        (dict(max_new_tokens=True), TypeError, r"`max_new_tokens` must be an int"),
        (dict(prompt_lengths=[6, 3, 0, 4]), ValueError, r"`prompt_lengths` must be in \[1, 6\].*bad entry 0"),
        (dict(prompt_lengths=[6, 3, 7, 4]), ValueError, r"`prompt_lengths` must be in \[1, 6\].*bad entry 7"),
        (dict(prompt_lengths=[6, 3, 1]), ValueError, r"`prompt_lengths` must have shape \(4,\).*\(3,\)"),
        (dict(context_size=0), ValueError, r"`context_size` must be >= 1.*got 0"),
        (dict(temperature=0.7), ValueError, r"`key` is None but temperature=0\.7.*key=jax\.random\.key\(0\).*temperature=0"),
        (dict(model=_bad_shape_model), ValueError, r"logits of shape \(4, 13, 16\); expected \[B, T, V\] = \[4, 14, V\]"),
        (dict(model=_bad_rank_model), ValueError, r"logits of shape \(4, 16\); expected \[B, T, V\]"),
        (dict(eos_id=16), ValueError, r"`eos_id` got \[16\]; each id must be in \[0, 16\)"),
        (dict(eos_id=[3, -1]), ValueError, r"`eos_id`.*\[0, 16\)"),
        (dict(eos_id=2.0), TypeError, r"`eos_id` must be a token id"),
        (dict(stop_sequences=[[3, 99]]), ValueError, r"`stop_sequences\[0\]` = \[3, 99\].*\[0, 16\)"),
        (dict(stop_sequences=[3, 4]), TypeError, r"`stop_sequences` must be a list of token-id lists"),
        (dict(logit_bias=np.zeros(15)), ValueError, r"`logit_bias` must be.*got shape \(15,\)"),
        (dict(logit_bias={16: 1.0}), ValueError, r"`logit_bias` has token id 16"),
        (dict(repetition_penalty=0.0), ValueError, r"`repetition_penalty` got 0\.0"),
        (dict(presence_penalty=np.inf), ValueError, r"`presence_penalty` must be finite"),
        (dict(top_p=0.0, key=jax.random.key(0)), ValueError, r"`top_p` got 0\.0"),
        (dict(temperature=np.ones(3), key=jax.random.key(0)), ValueError, r"`temperature` has shape \(3,\)"),
        (dict(key=jax.random.split(jax.random.key(0), 3)), ValueError, r"`key` must be a single key.*\(3,\)"),
        (dict(min_new_tokens=-1), ValueError, r"`min_new_tokens` got -1"),
        (dict(pad_id=16), ValueError, r"`pad_id` must be a token id in \[0, 16\).*got 16"),
        (dict(model=object()), TypeError, r"`model` must be callable"),
        (dict(processors=[lambda x: x]), TypeError, r"`processors` must be a LogitsProcessor"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(model=PLUS, prompt=PROMPT, max_new_tokens=N, temperature=0.0)
    args.update(kwargs)
    with pytest.raises(exc, match=match) as info:
        jaxdecode.generate(args.pop("model"), args.pop("prompt"), args.pop("max_new_tokens"), **args)
    assert "jaxdecode.generate" in str(info.value)


def test_bad_input_stream_and_cached():
    with pytest.raises(ValueError, match=r"`chunk_size` must be >= 1, got 0"):
        jaxdecode.generate_stream(PLUS, PROMPT, N, chunk_size=0, temperature=0.0)
    with pytest.raises(ValueError, match=r"KV-cached model cannot slide a window"):
        jaxdecode.generate(PLUS_CACHED, PROMPT, N, temperature=0.0, context_size=8)
    bad = jaxdecode.CachedModel(init_cache=lambda b, s: (), step=lambda t, p, c: t)
    with pytest.raises(TypeError, match=r"must return \(logits, cache\)"):
        jaxdecode.generate(bad, PROMPT, N, temperature=0.0)
    decode_v = jaxdecode.CachedModel(  # right shape at prefill, wrong vocabulary when decoding
        init_cache=lambda b, s: (), step=lambda t, p, c: (jnp.zeros(t.shape + (V if t.shape[1] > 1 else V + 1,)), c))
    with pytest.raises(ValueError, match=r"step \(decode\) returned logits of shape \(4, 1, 17\); expected .* \[4, 1, 16\]"):
        jaxdecode.generate(decode_v, PROMPT, N, temperature=0.0)
