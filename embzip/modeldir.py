"""Compressed model directories: write them (`embzip apply`) and load them back (`load_model`).

A factored directory holds the spliced model's weights in `embzip.safetensors` and a
`config.json` of model_type "embzip" that nests the original config; it holds no code. Plain
transformers cannot load it by mistake: without embzip, `AutoModel*.from_pretrained(DIR)` does not
know the model type and stops, and a concrete class such as `BertModel.from_pretrained(DIR)` finds
no weights file it knows and fails. After `import embzip` the Auto classes hand it to `load_model`
(embzip/hf.py). See docs/format.md.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import __version__, jsonout, outputs, stream
from .errors import FactorsError, ModelError, OutputError, usage
from .compressed import Compressed
from .models import LOAD_DTYPES
from .splice import (HEADS, CompressedEmbedding, _CompactEmbedding, _TiedHead, cache_decoded_head, check_head,
                     check_source, densify, holds_compact, splice)

WEIGHTS = "embzip.safetensors"
MANIFEST = "embzip.json"
DIR_FORMAT_VERSION = 4


def check_output_dir(path: str | os.PathLike, force: bool, inputs: tuple = ()) -> Path:
    """Refuse an output --force may not replace (see outputs.check_output_dir); `inputs`: the model's paths."""
    return outputs.check_output_dir(path, force, marker=MANIFEST, inputs=inputs)


def param_stats(model: torch.nn.Module) -> dict[str, int]:
    """Unique stored numbers and their bytes: parameters (shared tensors counted once) and the buffers of
    compressed embeddings (indices, packed integers, scales, codebooks)."""
    seen: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    for module in model.modules():
        if isinstance(module, _CompactEmbedding):
            for t in module.stored().values():
                seen.setdefault(id(t), t)
    return {"params": sum(p.numel() for p in seen.values()),
            "bytes": sum(p.numel() * p.element_size() for p in seen.values())}


def _weights_bytes(directory: str | Path, stem: str | None = None) -> int | None:
    """The bytes of the weights files a model loads from `directory`: its safetensors checkpoint (one file or an
    index's shards; `stem`: a compressed directory's, embzip.safetensors or its shards), else pytorch_model.bin or
    its index's shards; not other files beside them (a .bin copy next to the safetensors in a hub snapshot, a factors
    file, training_args.bin)."""
    from .checkpoint import find_checkpoint
    from .errors import ModelError

    directory = Path(directory)
    if not directory.is_dir():
        return None
    if stem is not None:
        try:
            return sum(f.stat().st_size for f in stream.weight_files(directory, stem))
        except (OSError, ValueError, KeyError):
            return None
    try:
        checkpoint = find_checkpoint(directory)
    except ModelError:
        checkpoint = None
    if checkpoint is not None:
        files = set(checkpoint.weight_map.values())
    elif (directory / "pytorch_model.bin").is_file():  # transformers loads it before an index, as for safetensors
        files = {"pytorch_model.bin"}
    elif (directory / "pytorch_model.bin.index.json").is_file():
        try:
            files = set(json.loads((directory / "pytorch_model.bin.index.json").read_text())["weight_map"].values())
        except (ValueError, KeyError):
            return None
    else:
        return None
    try:
        return sum((directory / f).stat().st_size for f in files) if files else None
    except OSError:
        return None


def _probe_ids(model: torch.nn.Module) -> torch.Tensor:
    """64 positions (fewer if the model takes fewer): a mismatch in position-dependent parts shows up."""
    from .models import text_config

    vocab = model.get_input_embeddings().num_embeddings
    config = text_config(model)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 64
    return (torch.arange(1, min(64, limit) + 1) * 7919 % vocab).unsqueeze(0)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits in eval mode (a caller's model in train mode: dropout would make every check fail), then
    back in the mode it had."""
    from .models import evaluating, input_device, outputs

    with torch.inference_mode(), evaluating(model):
        return outputs(model, ids.to(input_device(model))).float().cpu()


def _copy_side_files(opened, tmp: Path) -> None:
    if opened.tokenizer is not None:
        opened.tokenizer.save_pretrained(tmp)
    _save_generation_config(opened.model, tmp)


SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def copy_sentence_transformers_files(source: str | os.PathLike, out: Path) -> list[str]:
    """A sentence-transformers model's own files (modules.json, its settings, and the folders of the modules
    after the transformer: pooling, dense layers, normalisation), copied as they are, so that
    `SentenceTransformer(DIR)` after `import embzip` pools and normalises as the original does. The transformer
    module itself is the directory's model. Only from a local directory (or hub snapshot); returns what was
    copied."""
    import shutil

    source = Path(source)
    if not (source / "modules.json").is_file():
        return []
    copied = []
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
            copied.append(name)
    try:
        modules = json.loads((source / "modules.json").read_text(encoding="utf-8"))
        folders = [m["path"] for m in modules if not str(m.get("type", "")).endswith(".Transformer")]
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        import logging

        logging.getLogger(__name__).warning("%s/modules.json cannot be read (%s): its module folders were not "
                                            "copied", source, exc)
        return copied
    root = source.resolve()
    for folder in folders:
        where = (source / str(folder)).resolve()
        if folder and where.is_dir() and root in where.parents:  # a folder of the model's own, not "" or ../x
            shutil.copytree(where, out / str(folder), symlinks=False, dirs_exist_ok=True)
            copied.append(f"{folder}/")
    return copied


def _save_generation_config(model: torch.nn.Module, directory: Path) -> None:
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(directory)


def apply_factors(opened, factors: Compressed | str | os.PathLike, out: str | os.PathLike, *, head: str | None = None,
                  dense: bool = False, force: bool = False, command: str | None = None) -> dict[str, Any]:
    """Write a model directory using `factors`; reload it and check its logits. Returns a summary.

    `opened` is an OpenedModel, or MODEL as `open_model` takes it (opened as `embzip apply` does: the embedding
    read, the other weights copied from disk); `factors` is a Compressed or the path of a factors file.
    An OpenedModel's `.model` is left as written, compressed modules spliced in (or the rebuilt matrix written into
    it with `dense`), so it runs as the directory does; open the model again for the original (compressing it again
    is refused: its embedding is already compressed). Where no directory is written (an error, Ctrl-C) the
    splice is undone; a `dense` write into the matrix is not. `command` is the command line embzip.json records
    (the CLI's own; none where Python called this). The reload check runs the model in eval mode, then puts back
    the mode it had."""
    from safetensors.torch import save_model

    from .checkpoint import EmbeddingOnly
    from .factors import load_factors
    from .models import OpenedModel, model_spec, open_model

    if not isinstance(opened, OpenedModel):
        check_output_dir(out, force, (model_spec(opened),))
        opened = open_model(opened, load="stream")
    if not isinstance(factors, Compressed):
        factors = load_factors(factors)
    out = check_output_dir(out, force, (opened.path, opened.source))
    seen = outputs.identity(out)  # the swap replaces only this, or fails
    streamed = isinstance(opened, EmbeddingOnly)  # only the embedding is in memory: copy the rest from disk
    if streamed and stream.plan(opened.model, opened.checkpoint, opened.original_weight) is None:
        # the checkpoint names its tensors its own way: load the whole model
        opened, streamed = replace(open_model(opened.path, revision=opened.revision), source=opened.source), False
    model = opened.model
    check_source(model, factors)  # made for this model, not another of the same shape (before any writing)
    head = check_head(model, head)  # and a tied head only where the model has one
    before, source = param_stats(model), opened.describe()
    model_dtype = str(opened.embedding.dtype).removeprefix("torch.")
    if not dense:  # stored at 16 bits, as factors files are
        factors = factors.stored_as(opened.embedding.dtype)
    tmp = outputs.partial_dir(out)
    swap = None  # the splice, undone if the directory is not put in place
    try:
        if dense and streamed:
            stream.densify_skeleton(model, factors, head)
            model.config.save_pretrained(tmp)
        elif dense:
            densify(model, factors, head)
            model.save_pretrained(tmp)
        else:
            swap = splice(model, factors, head)
            # streamed layers are copied as the files hold them, which is what the directory must be built in
            stored = opened.checkpoint.main_dtype(exclude=opened.embedding_key) if streamed else None
            _write_config(model, tmp, head, factors.kind, model_dtype, base_dtype=stored)
            if not streamed:
                save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if streamed:
            check = stream.write_model(opened, tmp, "model" if dense else WEIGHTS.removesuffix(".safetensors"))
            stream.copy_side_files(opened.path, tmp)
        else:
            _copy_side_files(opened, tmp)
        copied = copy_sentence_transformers_files(opened.path, tmp)
        after = param_stats(model)
        summary = {
            "model": opened.source,
            "out": str(out),
            "format": "dense" if dense else "factored",
            "head": head,
            "kind": factors.kind,
            "rank": getattr(factors, "rank", None),
            "bits_per_weight": factors.bits_per_weight(),
            "method": factors.meta.get("method"),
            "params_before": before["params"],
            "params_after": after["params"],
            "bytes_before": before["bytes"],
            "bytes_after": after["bytes"],
            "weights_file_bytes_before": _weights_bytes(opened.path),
            "weights_file_bytes_after": _weights_bytes(tmp, None if dense else WEIGHTS.removesuffix(".safetensors")),
            "sentence_transformers_files": copied,
        }
        manifest = {
            "embzip_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command,  # the command line (the CLI's); None from Python, whose argv is another program's
            "source": source,
            "factors": factors.meta,
            **summary,
        }
        if streamed:  # files checked against their sources, the embedding module reloaded (docs/scale.md)
            diff, scale = check["max_abs_diff"], 1.0
            manifest["reload_check"] = summary["reload_check"] = "files and the embedding module"
        else:  # reload what was written and compare with the in-memory model before handing it over
            ids = _probe_ids(model)
            expected = _logits(model, ids)
            reloaded = _load_dense(tmp) if dense else load_model(tmp)
            diff = (_logits(reloaded, ids) - expected).abs().max().item()
            scale = expected.abs().max().item() or 1.0
            manifest["reload_check"] = summary["reload_check"] = "logits"
        if not diff <= 1e-4 * scale + 1e-5:
            raise ModelError(f"the written directory does not reproduce the model (max logit difference {diff:.3g}); "
                             "nothing was kept")
        summary["reload_max_abs_diff"] = manifest["reload_max_abs_diff"] = diff
        (tmp / MANIFEST).write_text(jsonout.dumps(manifest, indent=2))  # written last: the check's result in it
        outputs.swap_into_place(tmp, out, seen)
        swap = None  # written: the model stays as the directory is
    finally:
        if swap is not None:  # an error or Ctrl-C before the directory was in place: the caller's model as it was
            swap.restore()
        outputs.remove_partial(tmp)
    return summary


def _write_config(model: torch.nn.Module, directory: Path, head: str, kind: str, dtype: str,
                  base_dtype: str | None = None) -> None:
    """The config.json of a compressed directory: model type "embzip", the base model's config nested (its dtype
    replaced by `base_dtype` where given: the dtype a cast model has now, or the one the files hold)."""
    base = model.config.to_dict()
    if base_dtype is not None:
        base["dtype"] = base_dtype
    config = {
        "model_type": "embzip",
        "architectures": ["EmbzipModel"],
        "embzip_format_version": DIR_FORMAT_VERSION,
        "base_architecture": type(model).__name__,
        "base_config": base,
        "head": head,
        "kind": kind,
        "embedding_module": _module_name(model, model.get_input_embeddings()),
        "dtype": dtype,
    }
    if getattr(model, "pooler", False) is None:  # a masked LM's base (AutoModel's), built without its pooler
        config["base_init"] = {"add_pooling_layer": False}
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))


def save_compact(model: torch.nn.Module, directory: str | os.PathLike, *, is_main_process: bool = True,
                 safe_serialization: bool = True, max_shard_size: Any = None, state_dict: dict | None = None,
                 **unsupported: Any) -> None:
    """`save_pretrained` of a model with a compressed embedding spliced in (as `load_model` and `embzip apply`
    leave it): writes a compressed directory that `load_model`, or transformers after `import embzip`, loads
    back exactly. Plain transformers' save would write the compressed tensors under the original model's
    config, and loading that would give the model a fresh, random embedding without an error.

    Like transformers, it writes into `directory` (created if missing) and replaces files of the same names,
    and removes the weights shards and index of an earlier save there, which would be stale; it writes one
    weights file (`max_shard_size` is accepted and not used) and the generation config, not
    the tokenizer. A `state_dict` is taken where it holds the model's own values (the Trainer's checkpoints pass
    `model.state_dict()`); options that need the plain save (another state_dict, `push_to_hub`, a pickle format)
    are refused. A model whose compressed modules were all replaced by dense ones (`set_input_embeddings`) is
    dense again and saves as transformers saves it; one that still holds some is refused, before anything is written.
    """
    from safetensors.torch import save_model

    if unsupported or not safe_serialization:
        given = sorted(unsupported) + ([] if safe_serialization else ["safe_serialization=False"])
        raise ModelError(f"save_pretrained of a model with a compressed embedding takes a directory only "
                         f"(not {', '.join(given)}); it writes an embzip directory in safetensors")
    if state_dict is not None and not _is_own_state(model, state_dict):
        raise ModelError("save_pretrained of a model with a compressed embedding takes only the model's own "
                         "state_dict (as the Trainer passes it); load another into the model first "
                         "(model.load_state_dict) and save without one")
    if not holds_compact(model):  # the compressed modules were swapped out: a dense model, saved by transformers
        type(model).save_pretrained(model, directory, is_main_process=is_main_process,
                                    **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
        return
    if not isinstance(model.get_input_embeddings(), _CompactEmbedding):
        raise ModelError("this model's input embedding was replaced by a dense one while its output head still reads "
                         "the compressed embedding; set a matching output head (model.set_output_embeddings) or "
                         "put the compressed embedding back before saving")
    if not is_main_process:
        return
    if any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers())):
        raise ModelError("this model holds only its embedding in memory (opened with load='embedding', as `embzip "
                         "apply` opens a large model), so it cannot be saved from here; use the directory `apply` "
                         "wrote, or open the model whole")
    emb = model.get_input_embeddings()
    kind = emb.kind.kind if isinstance(emb, CompressedEmbedding) else "lowrank"
    head = "tied" if isinstance(model.get_output_embeddings(), _TiedHead) else "input"
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise usage(OutputError(f"{directory} exists and is not a directory"))
    directory.mkdir(parents=True, exist_ok=True)
    # the weights first and the config after them: a save that fails part way leaves no config naming weights
    # that are not there
    save_model(model, str(directory / WEIGHTS), metadata={"format": "pt"})
    stem = WEIGHTS.removesuffix(".safetensors")  # an earlier save's shards would be stale: removed, as transformers
    for stale in [*directory.glob(f"{stem}-*-of-*.safetensors"), directory / f"{stem}.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    _save_generation_config(model, directory)
    dtype = str(emb.out_dtype).removeprefix("torch.")
    _write_config(model, directory, head, kind, dtype, base_dtype=dtype)
    manifest = {"embzip_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "written_by": "save_pretrained", "kind": kind, "head": head}
    (directory / MANIFEST).write_text(jsonout.dumps(manifest, indent=2))


def _is_own_state(model: torch.nn.Module, state_dict: dict) -> bool:
    """Whether `state_dict` has the model's own names and values (the same tensors, or equal ones)."""
    own = model.state_dict()
    return state_dict.keys() == own.keys() and all(
        isinstance(t, torch.Tensor) and t.shape == own[k].shape and t.dtype == own[k].dtype
        and (t.data_ptr() == own[k].data_ptr() or torch.equal(t.cpu(), own[k].cpu()))
        for k, t in state_dict.items())


def _load_dense(directory: Path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    cls = getattr(transformers, config.architectures[0])
    return cls.from_pretrained(directory).eval()


def _module_name(model: torch.nn.Module, target: torch.nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _stored_embedding(directory: str | os.PathLike, model: torch.nn.Module, config: dict[str, Any]):
    """The compressed embedding held in a directory's weights file, as its kind's object.

    Directories from before `kind` was recorded hold low-rank factors (codes, decoder, bias, norms)."""
    from safetensors import SafetensorError, safe_open

    from .compressed import kind_class

    module = _module_name(model, model.get_input_embeddings())
    named = config.get("embedding_module") or module  # directories from before it was recorded name none
    if named != module:
        raise ModelError(f"{directory}/config.json names {named!r} as the embedding module, but the "
                         f"{type(model).__name__} it describes has its token embedding at {module!r}")
    prefix = module + "."
    tensors = {}
    try:
        for file in stream.weight_files(directory, WEIGHTS.removesuffix(".safetensors")):
            with safe_open(str(file), framework="pt") as f:
                tensors.update({key[len(prefix):]: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)})
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ModelError(f"{directory}: cannot read {WEIGHTS} ({str(exc).splitlines()[0]})") from None
    if not tensors:
        raise ModelError(f"{directory}: {WEIGHTS} holds no tensors of the compressed embedding ({prefix}*); "
                         "write the directory again with embzip apply")
    kind = config.get("kind", "lowrank")
    if kind != "lowrank":  # buffers named as splice.buffer_name wrote them
        tensors = {name.replace("__", "."): t for name, t in tensors.items()}
    if kind == "lowrank":
        names = {"codes": "codes", "decoder": "decoder", "bias": "decoder_bias", "norms": "norms"}
        tensors = {names[k]: v for k, v in tensors.items() if k in names}
    compressed = kind_class(kind).from_tensors(tensors, {})
    compressed.check_finite(f"{directory}'s compressed embedding", "the directory is damaged; write it again with "
                            "embzip apply")
    return compressed


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{directory} is not a model directory ({exc})") from None
    if not isinstance(config, dict) or config.get("model_type") != "embzip":
        raise ModelError(f"{directory} is not an embzip-compressed directory; open it with transformers")
    version = config.get("embzip_format_version", 0)  # 0: directories from before it was recorded
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ModelError(f"{path} is not a valid embzip config: embzip_format_version is {version!r}, not a whole "
                         "number; write the directory again with embzip apply")
    if version > DIR_FORMAT_VERSION:
        raise ModelError(f"{directory} was written by a newer embzip (directory format {version}); upgrade embzip")
    problem = _config_problem(config)
    if problem:
        raise ModelError(f"{path} is not a valid embzip config: {problem}; write the directory again with embzip apply")
    return config


def _config_problem(config: dict[str, Any]) -> str | None:
    """What is wrong with the fields load_model reads, or None."""
    base = config.get("base_config")
    if not isinstance(base, dict) or not isinstance(base.get("model_type"), str):
        return "no base_config with a model_type"
    if not isinstance(config.get("base_architecture"), str):
        return "no base_architecture"
    if config.get("head") not in HEADS:
        return f"head is {config.get('head')!r}, not one of {', '.join(HEADS)}"
    if config.get("base_init", {}) not in ({}, {"add_pooling_layer": False}):
        return f"base_init is {config.get('base_init')!r}, not {{\"add_pooling_layer\": false}}"
    base_dtype = base.get("dtype") or base.get("torch_dtype")
    for where, value in (("dtype", config.get("dtype")), ("base_config dtype", base_dtype)):
        if value is not None and str(value).removeprefix("torch.") not in LOAD_DTYPES:
            return f"{where} is {value!r}, not one of {', '.join(LOAD_DTYPES)}"
    return None


def _dtype(name: Any, directory: str | os.PathLike) -> torch.dtype:
    name = str(name).removeprefix("torch.")
    if name not in LOAD_DTYPES:
        raise ModelError(f"{directory}: dtype {name!r} is not one embzip loads ({', '.join(LOAD_DTYPES)})")
    return getattr(torch, name)


def _match_file_dtypes(model: torch.nn.Module, directory: str | os.PathLike, written: torch.dtype,
                      built: torch.dtype) -> None:
    """Give each parameter and persistent buffer the dtype it was written in, as from_pretrained would.

    A model may keep some modules in float32 (`_keep_in_fp32_modules`) while the rest is bfloat16: loading
    the file into a model built all in bfloat16 would round them. Tensors written in the model's own dtype
    (`written`) take the dtype the model is built in (`built`), except a compressed embedding's stored tensors.
    A tensor in any other dtype than those two and float32 (a float16 layer in a float32 or bfloat16 model's
    file, which no embzip writes but a hand-edited file may hold) takes `built` too, as from_pretrained would
    cast it; kept as it was, the first forward pass would fail on mixed dtypes.
    """
    from safetensors import safe_open

    from .checkpoint import FLOAT_DTYPES

    names = {code: getattr(torch, name) for code, name in FLOAT_DTYPES.items()}
    stored = {}
    for file in stream.weight_files(directory, WEIGHTS.removesuffix(".safetensors")):
        with safe_open(str(file), "pt") as f:
            stored.update({name: names.get(f.get_slice(name).get_dtype()) for name in f.keys()})
    for name, dtype in stored.items():
        module_path, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            continue  # the strict load names it
        tensor = getattr(module, attr, None)
        # a compressed embedding's stored tensors keep their format whatever the model is built in (as under casts)
        if isinstance(module, _CompactEmbedding):
            target = dtype
        else:
            target = dtype if dtype == torch.float32 and dtype != written else built
        if dtype is None or not isinstance(tensor, torch.Tensor) or tensor.dtype == target:
            continue
        if isinstance(tensor, torch.nn.Parameter):
            tensor.data = tensor.data.to(target)
        elif tensor.is_floating_point():
            setattr(module, attr, tensor.to(target))


def load_model(directory: str | os.PathLike, device: str = "cpu", dtype: str | torch.dtype | None = None,
               attn_implementation: str | None = None, cache_head: bool = False):
    """Load a directory written by `embzip apply` as the spliced transformers model, exactly.

    The base architecture is built the way `from_pretrained` builds it in the dtype the model had (so
    buffers such as rotary frequencies keep the precision they had), and every tensor gets the dtype it was
    written in. `dtype` (None or "auto": as written) builds it in another dtype instead;
    `attn_implementation` ("eager", "sdpa", ...) is passed on to transformers. `cache_head=True` makes a
    compressed (codebook, int8, int4) tied head decode its matrix once and keep it: forward passes as fast
    as the original's, memory larger by the decoded V x d matrix (splice.cache_decoded_head).
    """
    import transformers
    from safetensors import SafetensorError

    from .models import resolve_device

    device = resolve_device(device)  # "auto", and a GPU asked of a machine without one, as open_model takes them
    config = read_config(directory)
    base = dict(config["base_config"])
    cls = getattr(transformers, config["base_architecture"], None)
    try:
        if not isinstance(cls, type):
            raise ValueError(f"transformers has no model class {config['base_architecture']}")
        base_config = transformers.AutoConfig.for_model(base["model_type"]).__class__.from_dict(base)
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"{directory}/config.json names a model transformers cannot build: "
                         f"{str(exc).splitlines()[0]}") from None
    written = _dtype(base.get("dtype") or base.get("torch_dtype") or config.get("dtype", "float32"), directory)
    built = written if dtype is None or dtype == "auto" else _dtype(dtype, "dtype")
    # _from_config sets torch's default dtype while the model is built, as from_pretrained does; a plain
    # cls(config).to(dtype) would also cast buffers computed in float32 (rotary inv_freq) to bf16/fp16.
    extra = {"dtype": built, **config.get("base_init", {})}
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    from transformers.initialization import no_init_weights

    try:
        with no_init_weights():  # the strict load overwrites every weight; random init would cost seconds
            model = cls._from_config(base_config, **extra)
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        # a class that cannot be built from this config (GPT2LMHeadModel over a LlamaConfig: an edited file). Not
        # refused up front by comparing config classes: transformers builds some model types with another family's
        # class (internlm3 and exaone with LlamaForCausalLM), and those directories load.
        raise ModelError(f"{directory}/config.json names a model transformers cannot build: base_architecture "
                         f"{cls.__name__} from a {type(base_config).__name__} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    model.tie_weights()  # as from_pretrained would; splice() then sees the tie the original had
    splice(model, _stored_embedding(directory, model, config), config["head"])
    try:
        _match_file_dtypes(model, directory, written, built)
        stream.load_weights(model, directory, WEIGHTS.removesuffix(".safetensors"))  # one file or shards
    except (RuntimeError, OSError, SafetensorError) as exc:
        raise ModelError(f"{directory} does not hold the weights its config describes: {str(exc).splitlines()[0]}") from None
    model = model.eval().to(device)
    if cache_head:
        cache_decoded_head(model)
    return model
