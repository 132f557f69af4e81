"""Tokenizer: built from the default GGUF's metadata (SmolLM2 byte-level BPE), from a
tokenizer.json folder, and from a SentencePiece-style GGUF vocabulary; chat templates and
incremental (streaming) decoding."""

import json

import pytest

from jaxdecode.models import IncrementalDecoder, Tokenizer, default_model_path, read_gguf_metadata


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf_metadata(read_gguf_metadata(default_model_path()))


def test_encode_fact(tok):
    assert tok.encode("every effort moves you") == [18818, 3867, 7488, 346]
    assert tok.encode("every effort moves you", add_bos=True) == [1, 18818, 3867, 7488, 346]


def test_special_ids_and_special_tokens_in_text(tok):
    assert tok.bos_id == 1
    assert tok.eos_ids[0] == 2 and 0 in tok.eos_ids  # <|im_end|>, then <|endoftext|>
    assert tok.vocab_size == 49152
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"


def test_digits_are_split_individually(tok):
    ids = tok.encode("12345 apples")
    assert [tok.decode([i]) for i in ids[:5]] == list("12345")


@pytest.mark.parametrize("text", [
    "Hello, world!", "every effort moves you", "  leading spaces\n\n\ttabs", "I'm sure you're",
    "Ünïcödé façade — naïve café", "中文文本测试", "emoji 🙂👍🏽 mix", "x = f(3.14159) ** 2",
])
def test_decode_roundtrip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_incremental_decode_multibyte(tok):
    text = "Hi 世界 🙂👍🏽 done"
    ids = tok.encode(text)
    dec = tok.incremental_decoder()
    assert isinstance(dec, IncrementalDecoder)
    pieces = [dec(ids[:n]) for n in range(1, len(ids) + 1)]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    # some tokens are partial characters: their text is held back until complete
    assert "" in pieces
    # accepts numpy / lists of any ints, rejects ids that do not extend the previous ones
    with pytest.raises(ValueError):
        dec([ids[0] + 1])
    dec.reset()
    assert dec(ids[:1]) == tok.decode(ids[:1])


def test_incremental_decode_flushes_incomplete_tail(tok):
    ids = tok.encode("🙂")
    assert len(ids) > 1
    dec = tok.incremental_decoder()
    assert dec(ids[:-1]) == ""  # incomplete UTF-8 sequence is held back
    assert dec.flush() == tok.decode(ids[:-1])  # ... and released (as U+FFFD) at the end


def test_chat_template(tok):
    out = tok.apply_chat_template("What is the capital of France?")
    assert "What is the capital of France?" in out
    assert out.endswith("<|im_start|>assistant\n")
    assert out.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    out = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n")
    ids = tok.encode(tok.apply_chat_template("Hi", system="S"))
    a = tok.encode("assistant\n")
    assert ids[0] == 1 and ids[-len(a) - 1:] == [1] + a
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])


def test_from_file_and_chatml_fallback(tok, tmp_path):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    # bare tokenizer.json: ChatML fallback, no special ids
    bare = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert bare.encode("every effort moves you") == [18818, 3867, 7488, 346]
    assert bare.chat_template is None
    out = bare.apply_chat_template("Hello there")
    assert out == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    # with the HF side files
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    full = Tokenizer.from_file(tmp_path)  # a folder works too
    assert full.bos_id == 1 and full.eos_ids == (2, 0)
    assert full.apply_chat_template("yo") == "[user]yo[assistant]"
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        bad = tmp_path / "bad.json"
        bad.write_text("{not json")
        Tokenizer.from_file(bad)


def _spm_metadata():
    """A tiny SentencePiece-style ("llama") GGUF vocabulary: specials, 256 byte tokens, letters
    and merged pieces with scores in merge order."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d",  # single characters
              "he", "ll", "llo", "hello", "\u2581hello", "or", "ld", "wor", "world",
              "\u2581world"]
    for i, p in enumerate(pieces):
        tokens.append(p)
        types.append(1)
        scores.append(-float(i))
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


def test_sentencepiece_style_vocabulary():
    sp = Tokenizer.from_gguf_metadata(_spm_metadata())
    ids = sp.encode("hello world", add_bos=False)
    assert [sp.id_to_token(i) for i in ids] == ["\u2581hello", "\u2581world"]
    assert sp.decode(ids) == "hello world"
    # add_bos_token (SentencePiece GGUFs default to it): encode prepends BOS once
    assert sp.add_bos_token and sp.encode("hello world") == [1] + ids
    assert sp.encode(sp.id_to_token(1) + "hello world") == [1] + ids
    assert sp.eos_ids == (2,)
    # characters outside the vocabulary fall back to their UTF-8 bytes
    ids = sp.encode("hé", add_bos=False)
    assert [sp.id_to_token(i) for i in ids] == ["\u2581", "h", "<0xC3>", "<0xA9>"]
    assert sp.decode(ids) == "hé"
    dec = sp.incremental_decoder()
    assert "".join(dec(ids[:n]) for n in range(1, len(ids) + 1)) == "hé"


def test_gguf_metadata_errors():
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({})
    with pytest.raises(ValueError, match="unsupported tokenizer model"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert",
                                      "tokenizer.ggml.tokens": ["a"]})


def test_gemma_turn_template_when_a_gemma_vocabulary_ships_none():
    """A base Gemma GGUF has no chat template: a vocabulary with <start_of_turn> gets Gemma's
    turn format (system text folded into the first user turn), not ChatML."""
    meta = _spm_metadata()
    for t in ("<start_of_turn>", "<end_of_turn>"):
        meta["tokenizer.ggml.tokens"] = list(meta["tokenizer.ggml.tokens"]) + [t]
        meta["tokenizer.ggml.token_type"] = list(meta["tokenizer.ggml.token_type"]) + [3]
        meta["tokenizer.ggml.scores"] = list(meta["tokenizer.ggml.scores"]) + [0.0]
    tok = Tokenizer.from_gguf_metadata(meta)
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "hello "},
                                    {"role": "assistant", "content": "world"}], add_generation_prompt=True)
    assert text == ("<s><start_of_turn>user\nBe brief.\n\nhello<end_of_turn>\n"
                    "<start_of_turn>model\nworld<end_of_turn>\n<start_of_turn>model\n")
