"""Writing a model directory without loading the model: tensors are copied byte for byte, shard by shard.

`write_checkpoint` takes a source checkpoint, the names of the tensors to keep, and new tensors
(the spliced modules' state dict, with their prefixes); it writes safetensors shards mirroring the
source's (the new tensors go into the shard that held the first dropped one) and an index when
there is more than one. Kept tensors are never deserialised: their bytes are read from the source
file into a small buffer and written out, so memory stays at the buffer plus the new tensors,
whatever the size of the model. `check_written` then proves the files are what was meant: every
file opens with safetensors, holds exactly the planned names, shapes and dtypes, the new tensors
are byte-identical to the ones in memory, and sampled spans of each copied tensor equal the source.
See docs/format.md and docs/scale.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, read_header, sharded_index
from .errors import ModelError

_COPY_BYTES = 16 << 20
_SAMPLE_BYTES = 4096
ITEM_SIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_DTYPES = {torch.float64: "F64", torch.int64: "I64", torch.float32: "F32", torch.int32: "I32",
           torch.float16: "F16", torch.bfloat16: "BF16", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def shard_names(stem: str, count: int) -> list[str]:
    """model.safetensors, or model-00001-of-00003.safetensors ... as transformers names shards."""
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _tensor_bytes(tensor: torch.Tensor):
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _entry(name: str, value: Any, source: Checkpoint) -> tuple[str, list[int], Any]:
    """(dtype string, shape, where the bytes come from) of one tensor to write."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _DTYPES:
            raise ModelError(f"cannot write {name}: dtype {value.dtype} is not supported")
        return _DTYPES[value.dtype], list(value.shape), value
    file = source.weight_map[value]
    start, header = source.header(file)
    info = header[value]
    begin, end = info["data_offsets"]
    return info["dtype"], list(info["shape"]), (source.directory / file, start + begin, end - begin)


def _write_file(path: Path, entries: dict[str, tuple[str, list[int], Any]], metadata: dict[str, str]) -> int:
    """One safetensors file; tensors ordered by item size then name (so each is aligned), bytes streamed."""
    order = sorted(entries, key=lambda n: (-ITEM_SIZE.get(entries[n][0], 1), n))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape, data = entries[name]
        size = data.numel() * data.element_size() if isinstance(data, torch.Tensor) else data[2]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        for name in order:
            data = entries[name][2]
            if isinstance(data, torch.Tensor):
                out.write(_tensor_bytes(data))
                continue
            src_path, position, remaining = data
            with open(src_path, "rb") as src:
                src.seek(position)
                while remaining:
                    chunk = src.read(min(remaining, _COPY_BYTES))
                    if not chunk:
                        raise ModelError(f"{src_path} ends before its tensor data does; the checkpoint is truncated")
                    out.write(chunk)
                    remaining -= len(chunk)
    return offset


def write_checkpoint(source: Checkpoint, out_dir: str | os.PathLike, keep: list[str],
                     add: dict[str, torch.Tensor | str], *, stem: str = "model",
                     metadata: dict[str, str] | None = None) -> dict[str, str]:
    """Write `keep` (names in `source`, copied as bytes) and `add` (new name -> a tensor, or the name of a
    source tensor to copy under the new name) as safetensors shards `stem`*.safetensors in `out_dir`, plus
    `stem`.safetensors.index.json when there is more than one shard. Returns {tensor name: file name}."""
    out_dir = Path(out_dir)
    metadata = {"format": "pt", **(metadata or {})}
    keep_set = set(keep)
    dropped = [n for n in source.weight_map if n not in keep_set]
    home = source.weight_map[dropped[0]] if dropped else source.files[-1]
    groups = []
    for file in source.files:
        names = {n: n for n in keep if source.weight_map[n] == file}
        if file == home:
            names.update(add)
        if names:
            groups.append(names)
    if not groups:
        raise ModelError("nothing to write: no tensors kept or added")
    files = shard_names(stem, len(groups))
    weight_map: dict[str, str] = {}
    total = 0
    for file, names in zip(files, groups):
        entries = {new: _entry(new, value, source) for new, value in names.items()}
        total += _write_file(out_dir / file, entries, metadata)
        weight_map.update({name: file for name in entries})
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def _read(path: Path, position: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(position)
        return f.read(size)


def check_written(source: Checkpoint, out_dir: str | os.PathLike, weight_map: dict[str, str], keep: list[str],
                  add: dict[str, torch.Tensor | str]) -> None:
    """Raise ModelError unless the files in `out_dir` hold exactly `keep` + `add` as planned (see module doc)."""
    from safetensors import SafetensorError, safe_open

    out_dir = Path(out_dir)
    planned = {**{n: n for n in keep}, **add}
    found: dict[str, str] = {}
    for file in sorted(set(weight_map.values())):
        try:
            with safe_open(str(out_dir / file), framework="pt") as f:  # safetensors validates the header
                found.update({name: file for name in f.keys()})
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"the written {file} does not open ({exc}); nothing was kept") from None
    if found != weight_map or set(found) != set(planned):
        raise ModelError(f"the written files hold {sorted(set(found) ^ set(planned))[:5]} unplanned or missing; "
                         "nothing was kept")
    headers = {file: read_header(out_dir / file) for file in set(found.values())}
    for name, value in planned.items():
        start, header = headers[found[name]]
        info = header[name]
        begin, end = info["data_offsets"]
        dtype, shape, data = _entry(name, value, source)
        if (info["dtype"], info["shape"]) != (dtype, shape):
            raise ModelError(f"the written {name} is {info['dtype']} {info['shape']}, expected {dtype} {shape}")
        path = out_dir / found[name]
        if isinstance(data, torch.Tensor):
            expected = _tensor_bytes(data)
            for at in range(0, len(expected), _COPY_BYTES):
                part = expected[at:at + _COPY_BYTES].tobytes()
                if _read(path, start + begin + at, len(part)) != part:
                    raise ModelError(f"the written {name} differs from the tensor in memory; nothing was kept")
            continue
        src_path, position, size = data
        spans = {0, max(0, size - _SAMPLE_BYTES), (size // 2) // _SAMPLE_BYTES * _SAMPLE_BYTES}
        for at in spans:
            n = min(_SAMPLE_BYTES, size - at)
            if _read(path, start + begin + at, n) != _read(src_path, position + at, n):
                raise ModelError(f"the written {name} differs from the source at byte {at}; nothing was kept")


def weight_files(directory: str | os.PathLike, stem: str) -> list[Path]:
    """`stem`.safetensors, or its shards as its index lists them (the single file first where both are there, as
    checkpoint.find_checkpoint and transformers choose)."""
    directory = Path(directory)
    index = sharded_index(directory, stem)
    if index is not None:
        return [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [directory / f"{stem}.safetensors"]


def load_weights(model: torch.nn.Module, directory: str | os.PathLike, stem: str) -> None:
    """Load `stem`.safetensors (or its shards, by index) into `model`, strictly: every state-dict entry
    (tied duplicates once) must be in the files and nothing else may be."""
    from safetensors.torch import load_file

    directory = Path(directory)
    files = [f.name for f in weight_files(directory, stem)]
    expected: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        expected.setdefault(id(tensor), []).append(name)
    loaded: set[str] = set()
    for file in files:
        part = load_file(str(directory / file))
        result = model.load_state_dict(part, strict=False)
        if result.unexpected_keys:
            raise ModelError(f"{directory / file} holds tensors the model does not have: "
                             f"{', '.join(result.unexpected_keys[:5])}")
        loaded.update(part)
    missing = [names[0] for names in expected.values() if not loaded.intersection(names)]
    if missing:
        raise ModelError(f"{directory} lacks the tensor(s) {', '.join(missing[:5])}")


def plan(model: torch.nn.Module, source: Checkpoint, embedding: torch.Tensor | None = None,
         embedding_key: str | None = None) -> tuple[list[str], dict[str, torch.Tensor | str]] | None:
    """What to write for `model`'s state dict (tied entries once): source tensors to copy for the meta-device
    parameters, new tensors for the real ones (spliced modules, a rebuilt matrix), and a reference to the
    source embedding for the original matrix kept as an untied head. None when a meta-device entry has no
    tensor of the same name in `source` (the checkpoint names weights differently: load the model instead)."""
    buffers = {name for name, _ in model.named_buffers()}
    groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), (tensor, []))[1].append(name)
    keep: list[str] = []
    add: dict[str, torch.Tensor | str] = {}
    for tensor, names in groups.values():
        in_source = [n for n in names if n in source.weight_map]
        if embedding is not None and tensor is embedding:
            add[names[0]] = embedding_key
        elif tensor.device.type == "meta" or (in_source and names[0] in buffers):
            if not in_source:
                return None
            keep.append(in_source[0])
        else:
            add[names[0]] = tensor.detach()
    return keep, add


def rebuilt(factors, dtype: torch.dtype) -> torch.Tensor:
    """The V x d matrix the factors rebuild, in `dtype`, filled chunk by chunk (no float32 copy of it all)."""
    out = torch.empty(factors.shape, dtype=dtype)
    for i in range(0, factors.vocab, 4096):
        out[i:i + 4096] = factors.rows(slice(i, i + 4096)).to(dtype)
    return out


def densify_skeleton(model: torch.nn.Module, factors, head: str) -> None:
    """densify() for a meta-device skeleton: the rebuilt matrix becomes the embedding's new weight (the
    mapped original is never written to); with head 'input' on a tied model the head keeps the original."""
    from .models import is_tied
    from .splice import REBUILT

    emb = model.get_input_embeddings()
    tied = is_tied(model)
    weight = torch.nn.Parameter(rebuilt(factors, emb.weight.dtype), requires_grad=False)
    emb.weight = weight
    setattr(emb, REBUILT, True)  # no longer the original: compressing or scoring it as such is refused
    if tied and head == "tied":
        model.get_output_embeddings().weight = weight
    elif tied:
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False


def write_model(opened, out_dir: str | os.PathLike, stem: str, metadata: dict[str, str] | None = None) -> dict:
    """Stream `opened.model`'s weights (a skeleton with spliced or rebuilt modules) into `out_dir` from
    `opened.checkpoint`, check the files, and return {"max_abs_diff": ...} of the embedding module reloaded
    from them against the one in memory, on sampled tokens."""
    import copy

    model, source = opened.model, opened.checkpoint
    planned = plan(model, source, opened.original_weight, opened.embedding_key)
    if planned is None:
        raise ModelError(f"{opened.source}: the checkpoint's tensor names do not match the model's; "
                         "cannot stream it")
    keep, add = planned
    weight_map = write_checkpoint(source, out_dir, keep, add, stem=stem, metadata=metadata)
    check_written(source, out_dir, weight_map, keep, add)
    # The embedding module as it will be loaded: a copy filled from the written files, run on sampled ids.
    emb = model.get_input_embeddings()
    prefix = next(n for n, m in model.named_modules() if m is emb) + "."
    # Copy the module without its tensors (a rebuilt dense matrix would be copied whole): meta placeholders.
    placeholders = {id(t): (torch.nn.Parameter if isinstance(t, torch.nn.Parameter) else torch.Tensor)(
        torch.empty_like(t, device="meta")) for t in emb.state_dict(keep_vars=True).values()}
    fresh = copy.deepcopy(emb, placeholders)
    from safetensors import safe_open

    state = {}
    for name, file in weight_map.items():
        if name.startswith(prefix):
            with safe_open(str(Path(out_dir) / file), framework="pt") as f:
                state[name.removeprefix(prefix)] = f.get_tensor(name)
    fresh.load_state_dict(state, strict=True, assign=True)
    vocab = emb.num_embeddings
    ids = torch.cat([torch.arange(min(vocab, 16)), torch.randint(vocab, (256,), generator=torch.Generator().manual_seed(0)),
                     torch.arange(max(0, vocab - 16), vocab)]).unsqueeze(0)
    with torch.inference_mode():
        diff = (fresh(ids).float() - emb(ids).float()).abs().max().item()
    return {"max_abs_diff": diff}


def copy_side_files(source_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """The tokenizer and generation files of a model directory (and its folder of named chat templates), copied as
    they are (the files a hub snapshot links to, not the links)."""
    import shutil

    from .checkpoint import SIDE_FILES, SIDE_FOLDERS

    for name in SIDE_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, Path(out_dir) / name)
    for name in SIDE_FOLDERS:
        if (Path(source_dir) / name).is_dir():
            shutil.copytree(Path(source_dir) / name, Path(out_dir) / name)
