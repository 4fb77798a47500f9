"""embzip: compress the token embedding of transformer models into low-rank factors."""

__version__ = "0.1.0"

from .errors import DataError, EmbzipError, FactorsError, ModelError, OptionError, OutputError, RankError  # noqa: E402
from .models import DEFAULT_MODEL, DEMO_MODELS, OpenedModel, open_model  # noqa: E402
from .sizes import compression_ratio, max_useful_rank, rank_for_ratio  # noqa: E402


_LAZY = {
    "Factors": ("factors", "Factors"), "load_factors": ("factors", "load_factors"),
    "save_factors": ("factors", "save_factors"), "reconstruction_metrics": ("factors", "reconstruction_metrics"),
    "compress": ("pipeline", "compress"), "svd_factors": ("svd", "svd_factors"),
    "fit_autoencoder": ("autoencoder", "fit_autoencoder"), "FitConfig": ("autoencoder", "FitConfig"),
    "spliced": ("splice", "spliced"),
    "apply_factors": ("modeldir", "apply_factors"), "load_model": ("modeldir", "load_model"),
    "perplexity": ("scoring", "perplexity"), "load_text": ("texts", "load_text"),
    "bench": ("benchmark", "bench"), "BenchConfig": ("benchmark", "BenchConfig"),
    "Recipe": ("methods", "Recipe"), "make_factors": ("methods", "make_factors"),
    "aware_factors": ("aware", "aware_factors"),
}
__all__ = sorted(["DataError", "EmbzipError", "FactorsError", "ModelError", "OptionError", "OutputError", "RankError",
                  "DEFAULT_MODEL",
                  "DEMO_MODELS", "OpenedModel", "open_model", "compression_ratio", "max_useful_rank", "rank_for_ratio",
                  *_LAZY])


def __getattr__(name):  # torch-heavy pieces load on first use, so `import embzip` stays light
    if name not in _LAZY:
        raise AttributeError(f"module 'embzip' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)
