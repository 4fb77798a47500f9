"""embzip: compress the token embedding of transformer models into low-rank factors."""

__version__ = "0.1.0"

from .errors import DataError, EmbzipError, FactorsError, ModelError, OutputError, RankError  # noqa: E402
from .models import DEFAULT_MODEL, DEMO_MODELS, OpenedModel, open_model  # noqa: E402
from .sizes import compression_ratio, max_useful_rank, rank_for_ratio  # noqa: E402


def __getattr__(name):  # torch-heavy pieces load on first use, so `import embzip` stays light
    lazy = {
        "Factors": ("factors", "Factors"), "load_factors": ("factors", "load_factors"),
        "save_factors": ("factors", "save_factors"), "reconstruction_metrics": ("factors", "reconstruction_metrics"),
        "compress": ("compress", "compress"), "svd_factors": ("svd", "svd_factors"),
        "fit_autoencoder": ("autoencoder", "fit_autoencoder"), "FitConfig": ("autoencoder", "FitConfig"),
        "spliced": ("splice", "spliced"), "splice": ("splice", "splice"),
        "apply_factors": ("modeldir", "apply_factors"), "load_model": ("modeldir", "load_model"),
        "perplexity": ("perplexity", "perplexity"), "load_text": ("texts", "load_text"),
        "bench": ("bench", "bench"),
    }
    if name not in lazy:
        raise AttributeError(f"module 'embzip' has no attribute {name!r}")
    import importlib

    module, attr = lazy[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)
