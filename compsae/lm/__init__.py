"""The language model toolkit: loading models, the GPT-NeoX forward, hook capture,
tokenizers and offline assets. Only this package loads a model."""
