"""specjax: speculative decoding under test-time scaling, in JAX."""

from specjax.config import ModelConfig, SamplingConfig
from specjax.engine import GenerateOutput, generate
from specjax.model import Model, load

__all__ = ["GenerateOutput", "Model", "generate", "ModelConfig", "SamplingConfig", "load"]
__version__ = "0.1.0"
