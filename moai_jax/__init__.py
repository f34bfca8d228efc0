"""moai_jax: one virtual accelerator for JAX."""
