"""Compressed model directories: write them (`embzip apply`) and load them back (`load_model`).

A factored directory holds the spliced model's weights in `embzip.safetensors` and a
`config.json` of model_type "embzip" that nests the original config. Plain transformers cannot
load it by mistake: `AutoModel*.from_pretrained(DIR)` stops and asks for trust_remote_code (and
with it, the small `embzip_remote.py` shim hands over to `embzip.load_model`), and a concrete
class such as `BertModel.from_pretrained(DIR)` finds no weights file it knows and fails. See
docs/format.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import __version__, stream
from .errors import FactorsError, ModelError, OutputError
from .factors import Factors
from .splice import HEADS, default_head, densify, splice

WEIGHTS = "embzip.safetensors"
MANIFEST = "embzip.json"
REMOTE = "embzip_remote.py"
DIR_FORMAT_VERSION = 1
_REMOTE_CODE = '''"""Hands `AutoModel*.from_pretrained(DIR, trust_remote_code=True)` over to embzip.load_model.

This directory holds an embzip-compressed model (see embzip.json); `pip install embzip` to load it.
"""
from transformers import PretrainedConfig, PreTrainedModel


class EmbzipConfig(PretrainedConfig):
    model_type = "embzip"


class EmbzipModel(PreTrainedModel):
    config_class = EmbzipConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        from embzip import load_model

        return load_model(pretrained_model_name_or_path, device=kwargs.get("device_map") or "cpu")
'''


def check_output_dir(path: str | os.PathLike, force: bool) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputError(f"output directory {path} already exists and is not empty; pass --force to replace it")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"the parent directory {parent} of the output does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"the parent directory {parent} of the output is not writable")
    return path


def param_stats(model: torch.nn.Module) -> dict[str, int]:
    """Unique parameters and their bytes (shared tensors counted once)."""
    seen: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    return {"params": sum(p.numel() for p in seen.values()),
            "bytes": sum(p.numel() * p.element_size() for p in seen.values())}


def _weights_bytes(directory: str | Path) -> int | None:
    directory = Path(directory)
    if not directory.is_dir():
        return None
    return sum(f.stat().st_size for f in directory.iterdir() if f.suffix in (".safetensors", ".bin"))


def _probe_ids(model: torch.nn.Module) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    return (torch.arange(1, 17) * 7919 % vocab).unsqueeze(0)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    from .models import input_device, outputs

    with torch.inference_mode():
        return outputs(model, ids.to(input_device(model))).float().cpu()


def _copy_side_files(opened, tmp: Path) -> None:
    if opened.tokenizer is not None:
        opened.tokenizer.save_pretrained(tmp)
    generation = getattr(opened.model, "generation_config", None)
    if generation is not None and getattr(opened.model, "can_generate", lambda: False)():
        generation.save_pretrained(tmp)


def apply_factors(opened, factors: Factors, out: str | os.PathLike, *, head: str | None = None, dense: bool = False,
                  force: bool = False, command: str | None = None) -> dict[str, Any]:
    """Write a model directory using `factors`; reload it and check its logits. Returns a summary."""
    from safetensors.torch import save_model

    from .checkpoint import EmbeddingOnly

    out = check_output_dir(out, force)
    streamed = isinstance(opened, EmbeddingOnly)  # only the embedding is in memory: copy the rest from disk
    if streamed and stream.plan(opened.model, opened.checkpoint, opened.original_weight) is None:
        from .models import open_model  # the checkpoint names its tensors its own way: load the whole model

        opened, streamed = replace(open_model(opened.path, revision=opened.revision), source=opened.source), False
    model = opened.model
    head = head or default_head(model)
    if head not in HEADS:
        raise FactorsError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    before, source = param_stats(model), opened.describe()
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if dense and streamed:
            stream.densify_skeleton(model, factors, head)
            model.config.save_pretrained(tmp)
        elif dense:
            densify(model, factors, head)
            model.save_pretrained(tmp)
        else:
            splice(model, factors, head)
            config = {
                "model_type": "embzip",
                "architectures": ["EmbzipModel"],
                "auto_map": {name: "embzip_remote.EmbzipModel" for name in
                             ("AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM")}
                            | {"AutoConfig": "embzip_remote.EmbzipConfig"},
                "embzip_format_version": DIR_FORMAT_VERSION,
                "base_architecture": type(model).__name__,
                "base_config": model.config.to_dict(),
                "head": head,
                "rank": factors.rank,
                "bias": factors.bias is not None,
                "norms": factors.norms is not None,
                "dtype": str(model.get_input_embeddings().codes.dtype).removeprefix("torch."),
            }
            (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
            (tmp / REMOTE).write_text(_REMOTE_CODE)
            if not streamed:
                save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if streamed:
            check = stream.write_model(opened, tmp, "model" if dense else WEIGHTS.removesuffix(".safetensors"))
            stream.copy_side_files(opened.path, tmp)
        else:
            _copy_side_files(opened, tmp)
        after = param_stats(model)
        summary = {
            "model": opened.source,
            "out": str(out),
            "format": "dense" if dense else "factored",
            "head": head,
            "rank": factors.rank,
            "method": factors.meta.get("method"),
            "params_before": before["params"],
            "params_after": after["params"],
            "bytes_before": before["bytes"],
            "bytes_after": after["bytes"],
            "weights_file_bytes_before": _weights_bytes(opened.path),
            "weights_file_bytes_after": _weights_bytes(tmp),
        }
        manifest = {
            "embzip_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command or " ".join(sys.argv),
            "source": source,
            "factors": factors.meta,
            **summary,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if streamed:  # files checked against their sources, the embedding module reloaded (docs/scale.md)
            diff, scale = check["max_abs_diff"], 1.0
        else:  # reload what was written and compare with the in-memory model before handing it over
            ids = _probe_ids(model)
            expected = _logits(model, ids)
            reloaded = _load_dense(tmp) if dense else load_model(tmp)
            diff = (_logits(reloaded, ids) - expected).abs().max().item()
            scale = expected.abs().max().item() or 1.0
        if not diff <= 1e-4 * scale + 1e-5:
            raise ModelError(f"the written directory does not reproduce the model (max logit difference {diff:.3g}); "
                             "nothing was kept")
        summary["reload_max_abs_diff"] = diff
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return summary


def _load_dense(directory: Path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    cls = getattr(transformers, config.architectures[0])
    return cls.from_pretrained(directory).eval()


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{directory} is not a model directory ({exc})") from None
    if config.get("model_type") != "embzip":
        raise ModelError(f"{directory} is not an embzip-compressed directory; open it with transformers")
    if config.get("embzip_format_version", 0) > DIR_FORMAT_VERSION:
        raise ModelError(f"{directory} was written by a newer embzip (directory format "
                         f"{config['embzip_format_version']}); upgrade embzip")
    return config


def load_model(directory: str | os.PathLike, device: str = "cpu"):
    """Load a directory written by `embzip apply` as the spliced transformers model, exactly."""
    import transformers

    config = read_config(directory)
    base = dict(config["base_config"])
    config_cls = transformers.AutoConfig.for_model(base["model_type"]).__class__
    base_config = config_cls.from_dict(base)
    cls = getattr(transformers, config["base_architecture"])
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        model = cls(base_config).to(getattr(torch, config.get("dtype", "float32")))
    model.tie_weights()  # as from_pretrained would; splice() then sees the tie the original had
    vocab, hidden = model.get_input_embeddings().weight.shape
    rank = config["rank"]
    empty = Factors(torch.zeros(vocab, rank), torch.zeros(rank, hidden),
                    torch.zeros(hidden) if config["bias"] else None, torch.ones(vocab) if config["norms"] else None)
    splice(model, empty, config["head"])
    try:
        stream.load_weights(model, directory, WEIGHTS.removesuffix(".safetensors"))  # one file or shards
    except (RuntimeError, OSError) as exc:
        raise ModelError(f"{directory} does not hold the weights its config describes: {str(exc).splitlines()[0]}") from None
    return model.eval().to(device)
