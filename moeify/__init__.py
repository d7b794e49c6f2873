"""moeify: dense Hugging Face language models into Mixture-of-Experts checkpoints."""

__version__ = "0.1.0"
