"""embzip: compress the token embedding of transformer models into codebooks, low-rank factors or packed integers.

The library behind the `embzip` command (torch-heavy parts load on first use, so `import embzip` stays light):

    opened = embzip.open_model("demo:minilm")            # hub id, directory, .gguf file or demo name
    factors, summary = embzip.compress(opened, "codebook", bits=2, write=False)   # or out="f.safetensors"
    cost = embzip.perplexity(opened, embzip.load_text(None), factors=factors)      # an encoder: fidelity
    embzip.apply_factors(opened, factors, "minilm-cb2")  # a model directory; leaves `opened` compressed, like it
    model = embzip.load_model("minilm-cb2")              # or transformers' AutoModel*, after `import embzip`

- open_model, OpenedModel: a model with its tokenizer, kind (causal-lm, masked-lm, encoder) and tie.
- compress(model, method, rank= / ratio= / bits=, out=, write=): fit and (unless write=False) save factors;
  make_factors / Recipe for every setting of a method; svd_factors, aware_factors, fit_autoencoder directly.
- load_factors, save_factors, Factors: factors files (docs/format.md); reconstruction_metrics.
- apply_factors, load_model, spliced, cache_decoded_head: factors in a model, in memory or as a directory.
- perplexity, load_text, bench, BenchConfig: what the compression cost, alone or side by side.
- compression_ratio, rank_for_ratio, max_useful_rank: sizes of low-rank factors.
- EmbzipError and its kinds (ModelError, FactorsError, OptionError, RankError, DataError, OutputError): one-line
  messages, as the command prints them.
"""

__version__ = "0.1.0"

import sys  # noqa: E402

from .errors import DataError, EmbzipError, FactorsError, ModelError, OptionError, OutputError, RankError  # noqa: E402
from .models import DEFAULT_MODEL, DEMO_MODELS, OpenedModel, open_model  # noqa: E402
from .sizes import compression_ratio, max_useful_rank, rank_for_ratio  # noqa: E402


_LAZY = {
    "Factors": ("factors", "Factors"), "load_factors": ("factors", "load_factors"),
    "save_factors": ("factors", "save_factors"), "reconstruction_metrics": ("factors", "reconstruction_metrics"),
    "compress": ("pipeline", "compress"), "svd_factors": ("svd", "svd_factors"),
    "fit_autoencoder": ("autoencoder", "fit_autoencoder"), "FitConfig": ("autoencoder", "FitConfig"),
    "spliced": ("splice", "spliced"), "cache_decoded_head": ("splice", "cache_decoded_head"),
    "apply_factors": ("modeldir", "apply_factors"), "load_model": ("modeldir", "load_model"),
    "perplexity": ("scoring", "perplexity"), "load_text": ("texts", "load_text"),
    "bench": ("benchmark", "bench"), "BenchConfig": ("benchmark", "BenchConfig"),
    "Recipe": ("methods", "Recipe"), "make_factors": ("methods", "make_factors"),
    "aware_factors": ("aware", "aware_factors"),
}
__all__ = sorted(["DataError", "EmbzipError", "FactorsError", "ModelError", "OptionError", "OutputError", "RankError",
                  "DEFAULT_MODEL",
                  "DEMO_MODELS", "OpenedModel", "open_model", "compression_ratio", "max_useful_rank", "rank_for_ratio",
                  "register", *_LAZY])


def __getattr__(name):  # torch-heavy pieces load on first use, so `import embzip` stays light
    if name not in _LAZY:
        raise AttributeError(f"module 'embzip' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)


def __dir__():  # dir(), tab completion and help(embzip) see the lazy names too
    return sorted(set(globals()) | set(_LAZY))


def register() -> None:
    """Register embzip's config and model classes with transformers' Auto classes now.

    Not needed after `import embzip`, which registers them as soon as transformers' auto modules load.
    """
    from .hf import register as register_now

    register_now()


# `AutoModel*.from_pretrained(DIR)` must work after `import embzip` whichever of embzip and transformers is
# imported first, and `import embzip` must not import transformers (seconds, and torch with it). So the
# registration runs right after transformers imports its own auto modules: at once if they are loaded already,
# else from a finder on sys.meta_path that wraps the loader of those two modules. Until then it costs nothing.
_STEPS = {"transformers.models.auto.configuration_auto": "register_config",
          "transformers.models.auto.modeling_auto": "register_models"}


def _run_step(module: str) -> None:
    import importlib
    import warnings

    try:
        getattr(importlib.import_module(".hf", __name__), _STEPS[module])()
    except Exception as exc:  # never break the user's `import transformers`; say why embzip directories won't load
        warnings.warn(f"embzip could not register with transformers ({type(exc).__name__}: {exc}); "
                      "use embzip.load_model(DIR)", stacklevel=2)


class _AfterExec:
    """A loader that runs the original one, then embzip's registration step for that module."""

    def __init__(self, loader, module: str):
        self._loader, self._module = loader, module

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _run_step(self._module)

    def __getattr__(self, name):  # get_source, get_filename, ... as the original loader
        return getattr(self._loader, name)


class _RegisterWithTransformers:
    """A sys.meta_path finder that only touches transformers' two auto modules, and removes itself after."""

    def __init__(self):
        self.pending = set(_STEPS)

    def find_spec(self, name, path=None, target=None):
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _AfterExec(spec.loader, name)
                    return spec
        return None


def _install_hook() -> None:
    hook = _RegisterWithTransformers()
    for module in _STEPS:
        if module in sys.modules:
            hook.pending.discard(module)
            _run_step(module)
    if hook.pending and not any(isinstance(f, _RegisterWithTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, hook)


_install_hook()
