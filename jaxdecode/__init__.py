"""jaxdecode: exact, fast, compiled text decoding for language models in JAX."""

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
