"""embzip: compress the token embedding of transformer models into low-rank factors."""

__version__ = "0.1.0"
