"""Reading one tensor of a safetensors checkpoint without loading the model.

A model far larger than memory can still have its embedding compressed: the embedding is one
tensor in one file. `open_embedding` builds the model's skeleton on the `meta` device (no
weights, only shapes), asks it for its input embedding, finds that tensor's name in the
checkpoint (single file or sharded with an index; a local directory or a hub snapshot) and reads
it alone, in its stored dtype. safetensors maps the file, so the bytes come in as they are used
and are never copied: the resident cost is the embedding's bytes, whatever the size of the rest.
The result is an `EmbeddingOnly`, an `OpenedModel` whose other weights stay on `meta`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError
from .models import OpenedModel, check_token_embedding, is_tied

log = logging.getLogger("embzip")

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files beside the weights that a model directory needs: tokenizer and generation settings.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt", "vocab.json", "merges.txt",
              "chat_template.jinja", "chat_template.json", "generation_config.json")
SIDE_FOLDERS = ("additional_chat_templates",)  # a tokenizer's named chat templates beside its default one


def read_header(path: str | Path) -> tuple[int, dict[str, Any]]:
    """A safetensors file's header: where its data starts, and {name: {dtype, shape, data_offsets}}."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise ModelError(f"{path} is not a safetensors file ({exc})") from None
    return 8 + size, header


FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors -> torch


@dataclass
class Checkpoint:
    """The safetensors files of a model directory and which file holds each tensor."""

    directory: Path
    weight_map: dict[str, str]  # tensor name -> file name in `directory`
    _headers: dict[str, tuple[int, dict]] = field(default_factory=dict, repr=False)

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def header(self, file: str) -> tuple[int, dict[str, Any]]:
        if file not in self._headers:
            self._headers[file] = read_header(self.directory / file)
        return self._headers[file]

    def entry(self, name: str) -> dict[str, Any]:
        """{dtype, shape, data_offsets} of one tensor."""
        file = self.weight_map[name]
        tensors = self.header(file)[1]
        if name not in tensors:  # an index that names the wrong shard
            raise ModelError(f"{self.directory}'s index says tensor {name} is in {file}, which does not hold it; "
                             "the index or the shards are damaged: download or convert the model again")
        return tensors[name]

    def main_dtype(self, exclude: str | None = None) -> str | None:
        """The floating dtype (torch's name) that holds most of the stored numbers outside tensor `exclude`, or None.
        A config's dtype may not be what the file holds (a bfloat16 file under "dtype": "float32")."""
        import math

        totals: dict[str, int] = {}
        for entry in (self.entry(name) for name in self.weight_map if name != exclude):
            dtype = FLOAT_DTYPES.get(entry["dtype"])
            if dtype is not None:
                totals[dtype] = totals.get(dtype, 0) + math.prod(entry["shape"])
        return max(totals, key=totals.get) if totals else None

    def nbytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in self.files)

    def tensor(self, name: str):
        """One tensor, memory-mapped in its stored dtype (pages are read as they are touched)."""
        from safetensors import safe_open

        if name not in self.weight_map:
            raise ModelError(f"{self.directory} has no tensor {name!r}")
        with safe_open(str(self.directory / self.weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)


def sharded_index(directory: str | Path, stem: str = "model") -> Path | None:
    """The index to read `stem`'s shards by, or None where the folder holds `stem`.safetensors (which transformers
    loads before an index: shards beside it are left over from another save) or no index."""
    directory = Path(directory)
    index = directory / f"{stem}.safetensors.index.json"
    return index if index.is_file() and not (directory / f"{stem}.safetensors").is_file() else None


def find_checkpoint(directory: str | Path, *, shards_present: bool = True) -> Checkpoint | None:
    """The safetensors checkpoint of a local directory (one file, or sharded with an index); None if it has none.
    `shards_present=False` accepts an index whose shards are not all downloaded yet (a partial hub snapshot).

    model.safetensors comes first, as transformers looks for it first: a folder that also holds an index and
    shards (left over from another save) loads the single file, so embzip reads and copies that one too."""
    directory = Path(directory)
    index = sharded_index(directory)
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ModelError(f"{index} is not a safetensors index ({exc})") from None
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing and shards_present:
            raise ModelError(f"{directory} lacks the shard(s) its index names: {', '.join(missing)}")
        return Checkpoint(directory, dict(weight_map))
    files = [directory / SINGLE] if (directory / SINGLE).is_file() else sorted(directory.glob("*.safetensors"))
    if len(files) != 1:
        return None
    names = [n for n in read_header(files[0])[1] if n != "__metadata__"]
    return Checkpoint(directory, {n: files[0].name for n in names})


def hub_snapshot(repo_id: str, revision: str | None, *, all_weights: bool) -> Path | None:
    """A local snapshot of a hub model with its config, tokenizer and safetensors weights: all shards when
    `all_weights`, else only the index (the shard holding the embedding is fetched by `fetch_shard`).
    None when the repository has no safetensors weights."""
    from huggingface_hub import constants, list_repo_files, snapshot_download

    if constants.HF_HUB_OFFLINE:  # the cached snapshot, whose shards may all be there (else the full load says so)
        try:
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception as exc:
            log.debug("no cached snapshot of %s: %s", repo_id, exc)
            return None
    try:
        files = list_repo_files(repo_id, revision=revision)
    except Exception as exc:  # offline, unknown repository, no access: the full load reports it
        log.debug("cannot list %s: %s", repo_id, exc)
        return None
    if not any(f.endswith(".safetensors") for f in files):
        return None
    patterns = ["*.json", "*.model", "*.txt", "*.jinja"] + (["*.safetensors"] if all_weights else [])
    if not all_weights and (INDEX not in files or SINGLE in files):
        patterns.append(SINGLE)  # one file (which transformers loads before an index): it holds the embedding
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The folder of the local hub cache's snapshot of `repo_id` at `revision` (its config.json there), else None.
    Reads the cache only: a model transformers has just loaded by hub id has its files there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception as exc:  # noqa: BLE001 - a name the cache cannot hold: no snapshot to read
        log.debug("no cached snapshot of %s: %s", repo_id, exc)
        return None
    return Path(found).parent if isinstance(found, str) else None


def revision_of(path: str | Path, config: Any, revision: str | None) -> str | None:
    """The revision to record: the commit of the hub snapshot the files came from (the snapshot folder's name, also
    for a branch or tag asked for; transformers no longer sets config._commit_hash), else the one asked for, else
    None (a local directory)."""
    folder = Path(path)
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.name
    return revision or getattr(config, "_commit_hash", None)


def _fetch_shard(repo_id: str, revision: str | None, file: str) -> None:
    from huggingface_hub import hf_hub_download

    hf_hub_download(repo_id, file, revision=revision)


def _config_dtype(config: Any):
    """The torch dtype a config records (`dtype`, set by transformers when it reads `torch_dtype` too), or None."""
    import torch

    dtype = getattr(config, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def skeleton(config: Any, auto: Any, dtype: Any = None, trust_remote_code: bool = False):
    """The model of `config` with every parameter on the meta device (buffers stay real); tied as loaded. A model
    whose code comes with it is built only with trust_remote_code (the caller's flag, passed on, so transformers
    never asks on the terminal)."""
    from accelerate import init_empty_weights

    kwargs = {"dtype": dtype} if dtype is not None else {}
    with init_empty_weights():
        model = auto.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
    model.tie_weights()
    return model.eval()


def _module_name(model: Any, target: Any) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ModelError(f"could not locate the input embedding of {type(model).__name__}")


def tensor_name(model: Any, checkpoint: Checkpoint, module_name: str) -> str | None:
    """The checkpoint's name for `module_name`.weight: as is, with or without the base-model prefix, or the
    one name ending the same way."""
    want = f"{module_name}.weight"
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [want]
    if prefix:
        candidates += [want.removeprefix(prefix + "."), f"{prefix}.{want}"]
    for name in candidates:
        if name in checkpoint.weight_map:
            return name
    tail = "." + ".".join(want.split(".")[-2:])
    ending = [n for n in checkpoint.weight_map if n.endswith(tail) or n == tail[1:]]
    return ending[0] if len(ending) == 1 else None


def _untie_head_stored_apart(model: Any, checkpoint: Checkpoint, key: str) -> bool:
    """Whether a model its config ties stores an output head of other values than the embedding `key`; if so, the
    skeleton's head is untied (a placeholder of its own, copied from the checkpoint like any tensor) and so is its
    config, as transformers does when it loads such a checkpoint (it warns and keeps the stored head)."""
    import torch

    out = model.get_output_embeddings()
    head_key = tensor_name(model, checkpoint, _module_name(model, out))
    if head_key is None or head_key == key:
        return False
    if checkpoint.entry(head_key)["shape"] == checkpoint.entry(key)["shape"] and torch.equal(
            checkpoint.tensor(head_key), checkpoint.tensor(key)):
        return False  # stored twice, the same values: tied
    out.weight = torch.nn.Parameter(torch.empty_like(out.weight, device="meta"), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    log.warning("%s: the config ties the output head to the embedding, but the checkpoint stores a different "
                "%s; as transformers does, the head is kept as stored (untied)", checkpoint.directory, head_key)
    return True


def _tokenizer_size(path: Path) -> int | None:
    """len(tokenizer) from tokenizer.json without building the tokenizer (which can cost hundreds of MB);
    None when there is no tokenizer.json."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    vocab = data.get("model", {}).get("vocab")
    pieces = set(vocab) if isinstance(vocab, dict) else {p[0] for p in vocab or []}
    extra = {t["content"] for t in data.get("added_tokens", [])} - pieces
    return len(pieces) + len(extra)


_NOT_LOADED = object()


class EmbeddingOnly(OpenedModel):
    """An opened model whose only weights in memory are the embedding (and the head tied to it).

    `model` is a meta-device skeleton: shapes, config, module names and ties are right, but no forward
    pass can run. The tokenizer loads on first use. `checkpoint` gives access to every other tensor.
    """

    def __init__(self, *args, checkpoint: Checkpoint, embedding_key: str, trust_remote_code: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint, self.embedding_key, self._tokenizer_size = checkpoint, embedding_key, _NOT_LOADED
        self.trust_remote_code = trust_remote_code  # the command's setting, for the tokenizer built on first use
        self.original_weight = self.model.get_input_embeddings().weight  # the mapped tensor, kept through splices

    @property
    def tokenizer(self):
        """Built on first use, as open_model builds one (Gemma's costs about 0.5 GB; svd and apply never use it)."""
        if self._tokenizer is _NOT_LOADED:
            from .models import _tokenizer

            self._tokenizer = _tokenizer(self.source, self.path, self.revision, self.trust_remote_code)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value

    @property
    def tokenizer_size(self) -> int | None:
        """From tokenizer.json on first use, without building the tokenizer (parsing Gemma's 33 MB of it takes
        over a second, which only `embzip info` needs), unless the tokenizer is built already."""
        if self._tokenizer is _NOT_LOADED:
            if self._tokenizer_size is _NOT_LOADED:
                self._tokenizer_size = _tokenizer_size(Path(self.path))
            if self._tokenizer_size is not None:
                return self._tokenizer_size
        return super().tokenizer_size


def open_embedding(source: str, path: str, config: Any, auto: Any, kind: str, revision: str | None = None,
                   *, all_weights: bool = False, trust_remote_code: bool = False) -> EmbeddingOnly | None:
    """Open `path` reading only its embedding; None when that cannot be done (no safetensors weights, or no
    tensor matching the embedding), so the caller loads the whole model instead."""
    import torch

    local = Path(path)
    repo_id = None
    if not local.is_dir():
        repo_id = path
        local = hub_snapshot(path, revision, all_weights=all_weights)
        if local is None:
            return None
    checkpoint = find_checkpoint(local, shards_present=repo_id is None or all_weights)
    if checkpoint is None:
        return None
    try:
        model = skeleton(config, auto, _config_dtype(config), trust_remote_code)
    except ImportError:
        log.info("reading the embedding alone needs the 'accelerate' package; loading the whole model")
        return None
    emb = model.get_input_embeddings()
    check_token_embedding(emb, source)
    emb_name = _module_name(model, emb)
    key = tensor_name(model, checkpoint, emb_name)
    if key is None:
        log.info("no tensor for %s.weight in %s; loading the whole model", emb_name, local)
        return None
    if repo_id is not None and not (local / checkpoint.weight_map[key]).is_file():
        _fetch_shard(repo_id, revision, checkpoint.weight_map[key])
    stored = checkpoint.entry(key)
    if tuple(stored["shape"]) != tuple(emb.weight.shape):
        raise ModelError(f"{source}: the checkpoint's {key} is {stored['shape']} but the config says "
                         f"{list(emb.weight.shape)}")
    tied = is_tied(model) and not _untie_head_stored_apart(model, checkpoint, key)
    weight = torch.nn.Parameter(checkpoint.tensor(key), requires_grad=False)
    emb.weight = weight
    if tied:
        model.get_output_embeddings().weight = weight
    revision = revision_of(local, config, revision)
    return EmbeddingOnly(model, _NOT_LOADED, source, str(local), kind, tied, f"{emb_name}.weight", revision,
                         checkpoint=checkpoint, embedding_key=key, trust_remote_code=trust_remote_code)


def available_memory(device: str) -> dict[Any, int]:
    """Bytes free for weights per device accelerate knows: each visible GPU for a cuda device, else the CPU."""
    import psutil
    import torch

    if device.startswith("cuda"):
        return {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    return {"cpu": psutil.virtual_memory().available}


def device_map(path: str, config: Any, auto: Any, device: str, *, headroom: float = 0.8,
               trust_remote_code: bool = False) -> dict[str, Any] | None:
    """accelerate's big-model placement when the model does not fit on `device`, else None (load it there).

    The layers are spread over every visible GPU, then the CPU, then disk (offload folder); the embedding
    and the output head stay together on the first device, where factors are spliced in."""
    from accelerate import infer_auto_device_map

    checkpoint = find_checkpoint(path) if Path(path).is_dir() else None
    if checkpoint is None:
        return None
    need = checkpoint.nbytes()
    free = available_memory(device)
    first = next(iter(free))
    if need <= headroom * free[first]:
        return None
    budget = {k: int(headroom * v) for k, v in free.items()}
    if device.startswith("cuda"):
        budget["cpu"] = int(headroom * available_memory("cpu")["cpu"])
    dtype = _config_dtype(config)
    model = skeleton(config, auto, dtype, trust_remote_code)
    placement = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=model._no_split_modules,
                                      dtype=dtype)
    keep = [_module_name(model, model.get_input_embeddings())]
    if model.get_output_embeddings() is not None:
        keep.append(_module_name(model, model.get_output_embeddings()))
    for name in keep:
        _pin(placement, model, name, first)
    log.info("the model (%.1f GB) does not fit on %s: spreading it with accelerate over %s", need / 1e9, device,
             ", ".join(sorted({str(v) for v in placement.values()})))
    return placement


def _pin(placement: dict[str, Any], model: Any, target: str, device: Any) -> None:
    """Put module `target` on `device` in a device map, splitting any entry that covers it into its children."""
    while True:
        parent = next((n for n in placement if n != target and (n == "" or target.startswith(n + "."))), None)
        if parent is None:
            break
        where = placement.pop(parent)
        module = model.get_submodule(parent)
        for child, _ in module.named_children():
            placement[f"{parent}.{child}" if parent else child] = where
        for leaf, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            placement[f"{parent}.{leaf}" if parent else leaf] = where
    for name in [n for n in placement if n.startswith(target + ".")]:
        del placement[name]
    placement[target] = device
