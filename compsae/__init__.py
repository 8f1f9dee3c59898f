"""compsae: harvest activations, train Compositional SAEs and baselines, analyse composition."""

__version__ = "0.1.0"
