"""dsbn_jax: ALDA adversarial-learned loss with domain-specific batch norm, in JAX/Flax."""

__version__ = "0.1.0"
