"""jaxdecode: exact, fast, compiled text decoding for language models in JAX.

``jaxdecode.models`` (Llama / GPT-2, loaders, tokenizers) is imported on first use, so
``import jaxdecode`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._sampling import SamplingKnobs as SamplingKnobs
from ._sampling import apply_temperature as apply_temperature
from ._sampling import greedy as greedy
from ._sampling import min_p_filter as min_p_filter
from ._sampling import sample as sample
from ._sampling import sample_with_logprobs as sample_with_logprobs
from ._sampling import top_k_filter as top_k_filter
from ._sampling import top_p_filter as top_p_filter
from ._sampling import typical_filter as typical_filter

__version__ = "0.1.0"

from ._settings import SamplingParams as SamplingParams
from ._compilation import enable_compilation_cache as enable_compilation_cache
from ._model import CachedModel as CachedModel

from ._processors import DecodeContext as DecodeContext
from ._processors import LogitsProcessor as LogitsProcessor
from ._processors import apply_frequency_presence_penalty as apply_frequency_presence_penalty
from ._processors import apply_repetition_penalty as apply_repetition_penalty
from ._processors import ban_tokens as ban_tokens
from ._processors import chain as chain
from ._processors import dry_sequence_breakers as dry_sequence_breakers
from ._processors import frequency_presence_penalty as frequency_presence_penalty
from ._processors import identity as identity
from ._processors import logit_bias as logit_bias
from ._processors import min_new_tokens as min_new_tokens
from ._processors import no_repeat_ngram as no_repeat_ngram
from ._processors import penalties as penalties
from ._processors import repetition_penalty as repetition_penalty

from ._structured import Constraint as Constraint
from ._structured import choice as choice
from ._structured import json_schema as json_schema
from ._structured import regex as regex

from ._beam import BeamSearchOutput as BeamSearchOutput
from ._beam import beam_search as beam_search

from ._speculative import SpeculativeOutput as SpeculativeOutput
from ._speculative import draft_model as draft_model
from ._speculative import prompt_lookup as prompt_lookup
from ._speculative import speculative_generate as speculative_generate

from ._stop import Completion as Completion
from ._stop import completions as completions

from ._generate import GenerateOutput as GenerateOutput
from ._generate import StreamChunk as StreamChunk
from ._generate import generate as generate
from ._generate import generate_stream as generate_stream

_LAZY_SUBMODULES = ("models",)


def __getattr__(name: str) -> Any:
    # PEP 562: `jaxdecode.models` without importing the model stack at `import jaxdecode`.
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY_SUBMODULES))
