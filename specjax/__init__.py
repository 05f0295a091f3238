"""specjax: speculative decoding under test-time scaling, in JAX."""

from specjax import xla_flags
from specjax.cache_folder import enable_compilation_cache

xla_flags.apply()  # before JAX starts a backend: XLA reads its flags once
enable_compilation_cache()  # before anything compiles: a later process reads its programs from disk

from specjax.config import ModelConfig, SamplingConfig  # noqa: E402
from specjax.engine import GenerateOutput, generate  # noqa: E402
from specjax.model import Model, load  # noqa: E402
from specjax.plan import Plan, make_plan  # noqa: E402
from specjax.stats import GenerationStats  # noqa: E402

__all__ = ["GenerateOutput", "GenerationStats", "Model", "ModelConfig", "Plan", "SamplingConfig", "generate", "load",
           "make_plan"]
__version__ = "0.1.0"
