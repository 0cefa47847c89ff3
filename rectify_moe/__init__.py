"""rectify-moe: sparse Mixture-of-Experts language models with the Rectify-Router, in JAX/Flax NNX."""

__version__ = "0.1.0"
