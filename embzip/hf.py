"""Plain transformers loading of factored directories: `import embzip`, then `AutoModel*.from_pretrained(DIR)`.

A directory written by `embzip apply` has a `config.json` of model_type "embzip", a type stock
transformers does not know: without embzip it refuses the directory instead of loading it wrongly.
This module defines the config class and the model classes that transformers' Auto classes hand
such a directory to once they are registered; the model classes delegate to `embzip.load_model`,
so the result is the same model, computing the same logits (`AutoModel`: a language model's base,
as for the original). No code is ever read from the directory.

`register()` adds them to `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and
`AutoModelForMaskedLM`. `import embzip` arranges for it to run as soon as transformers' auto
modules are imported, in whichever order the two packages are imported (see embzip/__init__.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers.configuration_utils import PretrainedConfig

from .models import CAUSAL_LM, ENCODER, MASKED_LM, kind_of

MODEL_TYPE = "embzip"
# from_pretrained options that mean nothing for a local directory of embzip's, or that the Auto classes
# pass on their own; anything else would change the model and is refused rather than ignored.
_IGNORED = {"config", "trust_remote_code", "adapter_kwargs", "_from_auto", "_from_pipeline", "cache_dir",
            "force_download", "local_files_only", "proxies", "revision", "token", "code_revision",
            "low_cpu_mem_usage", "use_safetensors"}


class EmbzipConfig(PretrainedConfig):
    """A factored directory's config.json: the original config nested in `base_config`, and the factors' layout."""

    model_type = MODEL_TYPE


class EmbzipModel:
    """`AutoModel.from_pretrained(DIR)`: the architecture `embzip apply` wrote, as `embzip.load_model` rebuilds it,
    and of a language model its base (the subclasses, for the LM Auto classes, give the whole model)."""

    config_class = EmbzipConfig
    kind: str | None = None  # the only kind this Auto class accepts; None: any
    auto_name = "AutoModel"

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is not instantiated; use {self.auto_name}.from_pretrained(DIR) "
                        "or embzip.load_model(DIR)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, **kwargs: Any):
        from .modeldir import load_model, read_config

        if model_args:
            raise ValueError("loading an embzip-compressed directory takes no positional model arguments")
        directory = Path(pretrained_model_name_or_path) / (kwargs.pop("subfolder", None) or "")
        if not directory.is_dir():
            raise ValueError(f"{pretrained_model_name_or_path} is not a local directory: embzip loads compressed "
                             "models from a directory on disk (download a hub repository first)")
        device, dtype = _device(kwargs.pop("device_map", None)), kwargs.pop("dtype", None)
        dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
        attn = kwargs.pop("attn_implementation", None)
        cache_head = bool(kwargs.pop("cache_head", False))
        config = read_config(directory)
        given = kwargs.pop("config", None)
        if isinstance(given, EmbzipConfig):  # the Auto classes fold options such as attn_implementation into it
            attn = attn or getattr(given, "_attn_implementation_internal", None)
            kwargs.update(_folded_options(given, config))
        unknown = sorted(set(kwargs) - _IGNORED)
        if unknown:
            raise ValueError(f"from_pretrained option(s) {', '.join(unknown)} are not supported for the "
                             f"embzip-compressed directory {directory}; only device_map, dtype, "
                             "attn_implementation and cache_head are")
        kind = kind_of([config.get("base_architecture", "")])
        if cls.kind is not None and kind != cls.kind:
            what = "an encoder or a base model without a head" if kind == ENCODER else f"a {kind}"
            raise ValueError(f"{directory} holds a {config.get('base_architecture')} ({what}), not a {cls.kind}; "
                             "load it with the matching Auto class, AutoModel or embzip.load_model")
        model = load_model(directory, device=device, dtype=dtype, attn_implementation=attn, cache_head=cache_head)
        return model if cls.kind is not None else base_of(model)

    @classmethod
    def _from_config(cls, config, **kwargs):
        raise ValueError("an embzip config alone does not make a model; load the directory with "
                         f"{cls.auto_name}.from_pretrained(DIR) or embzip.load_model(DIR)")


def base_of(model):
    """What `AutoModel` gives for the original: a language model's base (the transformer without its head), with
    the compressed embedding and a save_pretrained that writes it as a compressed directory; an encoder as it is."""
    from .splice import protect

    base = model.base_model
    if base is not model:
        protect(base)
    return base


class EmbzipForCausalLM(EmbzipModel):
    """What `AutoModelForCausalLM.from_pretrained(DIR)` returns for a factored causal LM."""

    kind, auto_name = CAUSAL_LM, "AutoModelForCausalLM"


class EmbzipForMaskedLM(EmbzipModel):
    """What `AutoModelForMaskedLM.from_pretrained(DIR)` returns for a factored masked LM."""

    kind, auto_name = MASKED_LM, "AutoModelForMaskedLM"


def _folded_options(given: EmbzipConfig, written: dict[str, Any]) -> dict[str, Any]:
    """Options from_pretrained folded into the config (output_hidden_states=True, ...): what differs from the file."""
    fresh = EmbzipConfig.from_dict(written).to_dict()
    return {key: value for key, value in given.to_dict().items()
            if key not in ("_name_or_path", "dtype", "torch_dtype", "transformers_version") and fresh.get(key) != value}


def _device(device_map: Any) -> str:
    """from_pretrained's device_map as one device: None is the CPU; a map must put everything on one device."""
    from .models import resolve_device

    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError("an embzip-compressed model loads onto one device; device_map spreads it over "
                             f"{sorted(map(str, devices))}")
        device_map = devices.pop()
    if device_map is None:
        return "cpu"
    if isinstance(device_map, int):
        return f"cuda:{device_map}"
    return resolve_device(str(device_map))


def register_config() -> None:
    """Teach `AutoConfig` model_type "embzip" (idempotent)."""
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(MODEL_TYPE, EmbzipConfig, exist_ok=True)


def register_models() -> None:
    """Point `AutoModel`, `AutoModelForCausalLM` and `AutoModelForMaskedLM` at embzip's loader (idempotent)."""
    from transformers.models.auto import modeling_auto

    for auto, cls in (("AutoModel", EmbzipModel), ("AutoModelForCausalLM", EmbzipForCausalLM),
                      ("AutoModelForMaskedLM", EmbzipForMaskedLM)):
        getattr(modeling_auto, auto).register(EmbzipConfig, cls, exist_ok=True)


def register() -> None:
    """Register embzip's config and model classes with transformers' Auto classes (idempotent)."""
    register_config()
    register_models()
