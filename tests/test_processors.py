"""Logits processors (jaxdecode._processors) against the plain-NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode
from jaxdecode import reference as R

B, V = 4, 50


def assert_close(got, want, msg=""):
    """Same -inf pattern; finite values equal up to float32 rounding (XLA divides by a per-row
    value via its reciprocal and may fuse multiply-adds under jit)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == np.float32 and got.shape == want.shape, msg
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=msg)
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=2e-6, err_msg=msg)


@pytest.fixture
def case(np_rng):
    """Random logits (some exactly 0, some -inf), a ragged right-padded prompt and a few
    generated tokens, with the context built the library's way and the reference's way."""
    logits = (np_rng.normal(size=(B, V)) * 3).astype(np.float32)
    logits[:, :3] = 0.0
    logits[0, 5] = -np.inf
    lengths = np.array([6, 3, 0, 8])
    prompt = np_rng.integers(0, V - 1, size=(B, 8))
    prompt = np.where(np.arange(8)[None] < lengths[:, None], prompt, V - 1)  # pad id V-1 (ignored)
    prompt[:, 0] = np.where(lengths > 0, 1, prompt[:, 0])
    generated = np_rng.integers(0, 12, size=(B, 5))  # small ids: many repeats
    active = np.ones((B, 5), bool)
    active[1, 3:] = False  # row 1 finished after 3 tokens
    ctx = jaxdecode.DecodeContext.from_prompt(jnp.asarray(prompt), V, jnp.asarray(lengths))
    for t in range(5):
        ctx = ctx.advance(jnp.asarray(generated[:, t]), jnp.asarray(active[:, t]))
    counts = R.token_counts(generated, V, active)
    seen = R.prompt_mask(prompt, V, lengths) | (counts > 0)
    return dict(logits=logits, prompt=prompt, lengths=lengths, generated=generated, active=active, ctx=ctx, counts=counts, seen=seen)


def run(proc, logits, ctx, jit=False):
    update = jax.jit(proc.update) if jit else proc.update
    out, _ = update(jnp.asarray(logits), proc.init(ctx), ctx)
    return np.asarray(out)


# ---------------------------------------------------------------------------------------
# Context


def test_context_from_ragged_prompt_ignores_padding(case):
    ctx = case["ctx"]
    fresh = jaxdecode.DecodeContext.from_prompt(jnp.asarray(case["prompt"]), V, jnp.asarray(case["lengths"]))
    want = R.prompt_mask(case["prompt"], V, case["lengths"])
    np.testing.assert_array_equal(np.asarray(fresh.prompt_mask), want)
    assert not want[:, V - 1].any()  # the pad id is nowhere in the real prompts
    assert not np.asarray(fresh.prompt_mask)[2].any()  # empty prompt
    np.testing.assert_array_equal(np.asarray(fresh.token_counts), 0)
    np.testing.assert_array_equal(np.asarray(fresh.step), 0)
    # Padding outside the vocabulary (e.g. -1) is ignored as well.
    padded = np.where(np.arange(8)[None] < case["lengths"][:, None], case["prompt"], -1)
    c2 = jaxdecode.DecodeContext.from_prompt(padded, V, case["lengths"])
    np.testing.assert_array_equal(np.asarray(c2.prompt_mask), want)
    # Without lengths, every position counts.
    c3 = jaxdecode.DecodeContext.from_prompt(case["prompt"], V)
    np.testing.assert_array_equal(np.asarray(c3.prompt_mask), R.prompt_mask(case["prompt"], V))
    # The prompt mask does not change while generating.
    np.testing.assert_array_equal(np.asarray(ctx.prompt_mask), want)


def test_advance_counts_generated_tokens_and_skips_inactive_rows(case):
    ctx = case["ctx"]
    np.testing.assert_array_equal(np.asarray(ctx.token_counts), case["counts"])
    np.testing.assert_array_equal(np.asarray(ctx.step), case["active"].sum(axis=1))
    assert int(ctx.step[1]) == 3
    # Under jit, with an all-inactive step: nothing changes.
    same = jax.jit(lambda c, t, a: c.advance(t, a))(ctx, jnp.zeros(B, jnp.int32), jnp.zeros(B, bool))
    np.testing.assert_array_equal(np.asarray(same.token_counts), case["counts"])
    np.testing.assert_array_equal(np.asarray(same.step), np.asarray(ctx.step))
    # Without `active`, every row advances.
    nxt = ctx.advance(jnp.array([7, 7, 7, 7]))
    np.testing.assert_array_equal(np.asarray(nxt.token_counts)[:, 7], case["counts"][:, 7] + 1)
    np.testing.assert_array_equal(np.asarray(nxt.step), np.asarray(ctx.step) + 1)


# ---------------------------------------------------------------------------------------
# Each processor against the reference


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.7, [1.0, 2.0, 1.5, 0.5]])
def test_repetition_penalty(case, penalty, jit):
    got = run(jaxdecode.repetition_penalty(penalty), case["logits"], case["ctx"], jit)
    want = R.apply_repetition_penalty(case["logits"], case["seen"], penalty)
    assert_close(got, want)
    # Functional form.
    assert_close(jaxdecode.apply_repetition_penalty(jnp.asarray(case["logits"]), jnp.asarray(case["seen"]), penalty), want)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    ctx = jaxdecode.DecodeContext.from_prompt(jnp.array([[0, 1]]), 5).advance(jnp.array([2]))
    out = run(jaxdecode.repetition_penalty(2.0), np.array([[3.0, -3.0, 0.5, 4.0, -1.0]], np.float32), ctx)
    # prompt tokens 0, 1 and generated token 2 are penalised; 3 and 4 are not.
    np.testing.assert_array_equal(out, [[1.5, -6.0, 0.25, 4.0, -1.0]])


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("frequency,presence", [(0.0, 0.0), (0.5, 0.0), (0.0, 1.5), (0.7, -0.4), ([0.1, 0.0, 2.0, 1.0], [1.0, 0.5, 0.0, -1.0])])
def test_frequency_presence_penalty(case, frequency, presence, jit):
    got = run(jaxdecode.frequency_presence_penalty(frequency, presence), case["logits"], case["ctx"], jit)
    # OpenAI: logit - frequency * count - presence * [count > 0], over generated tokens only.
    want = R.apply_frequency_presence_penalty(case["logits"], case["counts"], frequency, presence)
    assert_close(got, want)
    assert_close(
        jaxdecode.apply_frequency_presence_penalty(jnp.asarray(case["logits"]), jnp.asarray(case["counts"]), frequency, presence),
        want,
    )


def test_frequency_presence_ignore_the_prompt():
    ctx = jaxdecode.DecodeContext.from_prompt(jnp.array([[0, 0, 1]]), 4)
    ctx = ctx.advance(jnp.array([1])).advance(jnp.array([1])).advance(jnp.array([2]))
    out = run(jaxdecode.frequency_presence_penalty(0.5, 1.0), np.zeros((1, 4), np.float32), ctx)
    np.testing.assert_array_equal(out, [[0.0, -2.0, -1.5, 0.0]])


@pytest.mark.parametrize("jit", [False, True])
def test_penalties_use_vllm_order(case, jit):
    got = run(jaxdecode.penalties(1.8, 0.3, 0.6), case["logits"], case["ctx"], jit)
    want = R.apply_repetition_penalty(case["logits"], case["seen"], 1.8)
    want = R.apply_frequency_presence_penalty(want, case["counts"], 0.3, 0.6)
    assert_close(got, want)
    # The order matters: frequency/presence first would give something else.
    other = R.apply_repetition_penalty(R.apply_frequency_presence_penalty(case["logits"], case["counts"], 0.3, 0.6), case["seen"], 1.8)
    assert not np.allclose(got, other)


@pytest.mark.parametrize("jit", [False, True])
def test_logit_bias_dict_and_dense(case, jit):
    bias = {0: 5.0, 7: -2.5, V - 1: -100.0}
    got = run(jaxdecode.logit_bias(bias, vocab_size=V), case["logits"], case["ctx"], jit)
    np.testing.assert_array_equal(got, R.apply_logit_bias(case["logits"], bias))
    dense = np.linspace(-1, 1, V).astype(np.float32)
    np.testing.assert_array_equal(run(jaxdecode.logit_bias(dense), case["logits"], case["ctx"], jit), R.apply_logit_bias(case["logits"], dense))
    per_row = np.random.default_rng(0).normal(size=(B, V)).astype(np.float32)
    np.testing.assert_array_equal(
        run(jaxdecode.logit_bias(per_row), case["logits"], case["ctx"], jit), R.apply_logit_bias(case["logits"], per_row)
    )


@pytest.mark.parametrize("jit", [False, True])
def test_ban_tokens(case, jit):
    got = run(jaxdecode.ban_tokens([3, 9, 3]), case["logits"], case["ctx"], jit)
    np.testing.assert_array_equal(got, R.ban_tokens(case["logits"], [3, 9]))
    assert np.all(got[:, [3, 9]] == -np.inf)
    np.testing.assert_array_equal(run(jaxdecode.ban_tokens([]), case["logits"], case["ctx"], jit), case["logits"])


@pytest.mark.parametrize("jit", [False, True])
def test_min_new_tokens_bans_eos_only_while_step_below_n(case, jit):
    eos = [2, 11]
    ctx = jaxdecode.DecodeContext.from_prompt(jnp.zeros((B, 1), jnp.int32), V)
    for step in range(5):
        for n in (3, [0, 1, 4, 10]):
            got = run(jaxdecode.min_new_tokens(n, eos), case["logits"], ctx, jit)
            want = R.apply_min_new_tokens(case["logits"], np.asarray(ctx.step), n, eos)
            np.testing.assert_array_equal(got, want)
            banned = np.asarray(ctx.step) < np.broadcast_to(n, (B,))
            assert np.all(np.isneginf(got[:, eos]) == banned[:, None])
        ctx = ctx.advance(jnp.full((B,), 5, jnp.int32))
    # Rows that stopped advancing (inactive) stay banned while their own step is below n.
    ctx = jaxdecode.DecodeContext.from_prompt(jnp.zeros((2, 1), jnp.int32), V)
    for _ in range(3):
        ctx = ctx.advance(jnp.array([5, 5]), jnp.array([True, False]))
    got = run(jaxdecode.min_new_tokens(2, eos), case["logits"][:2], ctx)
    assert not np.isneginf(got[0, eos]).any() and np.isneginf(got[1, eos]).all()


# ---------------------------------------------------------------------------------------
# chain


def _counter(add: float) -> jaxdecode.LogitsProcessor:
    """A stateful processor: adds ``add * (number of calls so far)`` and counts its calls."""
    return jaxdecode.LogitsProcessor(
        init=lambda ctx: jnp.zeros((), jnp.int32),
        update=lambda l, s, ctx: (l + add * s, s + 1),
    )


def test_chain_applies_in_order(case):
    logits, ctx = case["logits"], case["ctx"]
    bias = {int(np.nonzero(case["seen"][0])[0][0]): -3.0}
    a = run(jaxdecode.chain(jaxdecode.repetition_penalty(2.0), jaxdecode.logit_bias(bias, V)), logits, ctx)
    b = run(jaxdecode.chain(jaxdecode.logit_bias(bias, V), jaxdecode.repetition_penalty(2.0)), logits, ctx)
    assert_close(a, R.apply_logit_bias(R.apply_repetition_penalty(logits, case["seen"], 2.0), bias))
    assert_close(b, R.apply_repetition_penalty(R.apply_logit_bias(logits, bias), case["seen"], 2.0))
    assert not np.array_equal(a, b)
    # The full vLLM-style pipeline.
    proc = jaxdecode.chain(
        jaxdecode.penalties(1.5, 0.2, 0.4),
        jaxdecode.logit_bias(bias, V),
        jaxdecode.ban_tokens([4]),
        jaxdecode.min_new_tokens(4, [2]),
    )
    want = R.apply_repetition_penalty(logits, case["seen"], 1.5)
    want = R.apply_frequency_presence_penalty(want, case["counts"], 0.2, 0.4)
    want = R.ban_tokens(R.apply_logit_bias(want, bias), [4])
    want = R.apply_min_new_tokens(want, np.asarray(ctx.step), 4, [2])
    assert_close(run(proc, logits, ctx), want)
    assert_close(run(proc, logits, ctx, jit=True), want)


def test_chain_threads_each_processors_state(case):
    logits, ctx = jnp.asarray(case["logits"]), case["ctx"]
    proc = jaxdecode.chain(_counter(1.0), jaxdecode.identity(), _counter(10.0))
    state = proc.init(ctx)
    assert isinstance(state, tuple) and len(state) == 3
    update = jax.jit(proc.update)
    for i in range(3):
        out, state = update(logits, state, ctx)
        np.testing.assert_allclose(np.asarray(out), case["logits"] + 11.0 * i, rtol=1e-6)
    assert int(state[0]) == 3 and int(state[2]) == 3
    # An empty chain is the identity.
    empty = jaxdecode.chain()
    out, st = empty.update(logits, empty.init(ctx), ctx)
    np.testing.assert_array_equal(np.asarray(out), case["logits"]) and st == ()


# ---------------------------------------------------------------------------------------
# Bad input


def _raises(exc, fn, *words):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_bad_processor_arguments():
    _raises(ValueError, lambda: jaxdecode.repetition_penalty(0.0), "penalty", "0.0", "> 0")
    _raises(ValueError, lambda: jaxdecode.repetition_penalty([1.0, -2.0]), "penalty", "-2.0", "> 0")
    _raises(ValueError, lambda: jaxdecode.frequency_presence_penalty(frequency=float("nan")), "frequency", "nan")
    _raises(ValueError, lambda: jaxdecode.frequency_presence_penalty(presence=float("inf")), "presence", "inf", "finite")
    _raises(ValueError, lambda: jaxdecode.frequency_presence_penalty(frequency=[0.0, -float("inf")]), "frequency", "inf", "finite")
    _raises(TypeError, lambda: jaxdecode.frequency_presence_penalty(frequency="high"), "frequency", "high")
    _raises(ValueError, lambda: jaxdecode.min_new_tokens(-1, [2]), "n", "-1", ">= 0")
    _raises(TypeError, lambda: jaxdecode.min_new_tokens(1.5, [2]), "n", "1.5", "integer")
    _raises(ValueError, lambda: jaxdecode.logit_bias({3: 1.0}), "logit_bias", "vocab_size")
    _raises(ValueError, lambda: jaxdecode.logit_bias({12: 1.0}, vocab_size=10), "12", "[0, 10)")
    _raises(ValueError, lambda: jaxdecode.logit_bias({-1: 1.0}, vocab_size=10), "-1", "[0, 10)")
    _raises(TypeError, lambda: jaxdecode.chain(jaxdecode.identity(), "ban"), "chain", "argument 1", "str")


def test_bad_ids_and_prompts():
    ctx = jaxdecode.DecodeContext.from_prompt(jnp.zeros((1, 2), jnp.int32), 10)
    x = jnp.zeros((1, 10))
    with pytest.raises(ValueError, match=r"ids.*\[12\].*\[0, 10\)"):
        proc = jaxdecode.ban_tokens([12])
        proc.update(x, proc.init(ctx), ctx)
    with pytest.raises(ValueError, match=r"ids.*-1.*\[0, 10\)"):
        proc = jaxdecode.ban_tokens([-1])
        proc.update(x, proc.init(ctx), ctx)
    with pytest.raises(ValueError, match=r"eos_ids.*\[10\].*\[0, 10\)"):
        proc = jaxdecode.min_new_tokens(2, [10])
        proc.update(x, proc.init(ctx), ctx)
    _raises(ValueError, lambda: jaxdecode.DecodeContext.from_prompt(jnp.zeros((3,), jnp.int32), 10), "prompt", "[B, P]", "(3,)")
    # A real (non-padding) prompt token outside the vocabulary is an error, not silently clipped.
    _raises(ValueError, lambda: jaxdecode.DecodeContext.from_prompt(np.array([[3, 12]]), 10), "prompt", "12", "[0, 10)")
    _raises(ValueError, lambda: jaxdecode.DecodeContext.from_prompt(np.array([[3, -2], [1, 1]]), 10, [2, 2]), "prompt", "-2")
    # ... but padding beyond prompt_lengths may hold anything.
    jaxdecode.DecodeContext.from_prompt(np.array([[3, 12]]), 10, [1])


def test_per_row_knob_of_the_wrong_batch_size_fails_loudly():
    ctx = jaxdecode.DecodeContext.from_prompt(jnp.zeros((2, 1), jnp.int32), 5)
    proc = jaxdecode.repetition_penalty([1.0, 1.2, 1.5])
    with pytest.raises(ValueError, match=r"repetition_penalty.*\(3,\).*\(2,\)"):
        proc.update(jnp.zeros((2, 5)), proc.init(ctx), ctx)
