"""Peak memory and time of `embzip svd`, `fit --method wsvd`, `fit --bits B` (codebook) and `apply` on a
checkpoint far larger than its embedding, against a plain read of the same bytes.

    python scripts/scale_bench.py DIR              # Llama-3-8B shapes, bf16, about 16 GB in DIR/checkpoint
    python scripts/scale_bench.py DIR --shape small --json

The checkpoint (random weights, a Llama config, 2 GB shards with an index, a tiny tokenizer whose
vocabulary is shorter than the embedding, as padded vocabularies are) is built once into
DIR/checkpoint and reused. Each command runs in a child process; its peak RSS is that child's
ru_maxrss. Delete DIR afterwards (or pass --clean).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # name: (vocab, hidden, layers, intermediate, heads, kv heads, tied)
    "llama3-8b": (128256, 4096, 32, 14336, 32, 8, False),
    "small": (32768, 512, 30, 3072, 8, 2, False),  # the test's: 32 MB embedding, ~10x more elsewhere
    "tiny": (1024, 64, 2, 128, 4, 2, False),  # the test's baseline: the same commands with next to no data
}
WORDS = "the of and to a in is it you that he was for on are with as his they be at one have this from".split()


def build_checkpoint(path: Path, shape: str = "llama3-8b", shard_bytes: int = 2 << 30, seed: int = 0) -> Path:
    """Write a random bf16 Llama-shaped checkpoint (sharded safetensors + index, config, tokenizer) to `path`."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    if (path / "config.json").is_file():
        return path
    vocab, hidden, layers, inter, heads, kv, tied = SHAPES[shape]
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                      intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                                      tie_word_embeddings=tied, max_position_embeddings=8192, bos_token_id=2,
                                      eos_token_id=3, pad_token_id=0, dtype="bfloat16",
                                      architectures=["LlamaForCausalLM"])
    with init_empty_weights():
        skeleton = transformers.LlamaForCausalLM(config)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shard: dict = {}
    written: list[tuple[Path, list[str]]] = []
    total = 0

    def flush() -> None:  # one shard in memory at a time
        file = tmp / f"shard-{len(written)}.tmp"
        save_file(shard, file, metadata={"format": "pt"})
        written.append((file, list(shard)))
        shard.clear()

    for name, param in skeleton.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        if param.ndim == 1:
            tensor = torch.ones(param.shape, dtype=torch.bfloat16)  # norms
        else:
            tensor = torch.empty(param.shape, dtype=torch.bfloat16).uniform_(-0.03, 0.03, generator=gen)
        nbytes = tensor.numel() * 2
        if shard and sum(t.numel() * 2 for t in shard.values()) + nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        total += nbytes
    flush()
    weight_map = {}
    for i, (file, names) in enumerate(written, 1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        file.rename(tmp / final)
        weight_map.update({n: final for n in names})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))
    config.save_pretrained(tmp)
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                         bos_token="<s>", eos_token="</s>").save_pretrained(tmp)
    tmp.rename(path)
    return path


def measure(argv: list[str]) -> dict:
    """Run `argv` in a child process; its wall seconds and peak RSS (bytes), through a small wrapper."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "print(r.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout
    rc, seconds, kib = out.split()
    if int(rc):
        raise SystemExit(f"{' '.join(argv)} failed with exit code {rc}")
    return {"seconds": float(seconds), "peak_rss": int(kib) * 1024}


def plain_read(files: list[Path], ranges: list[tuple[Path, int, int]] | None = None) -> float:
    """Seconds to read the given files (or byte ranges) with plain reads into a 16 MB buffer."""
    start = time.perf_counter()
    buffer = bytearray(16 << 20)
    for path, begin, length in ranges or [(f, 0, f.stat().st_size) for f in files]:
        with open(path, "rb", buffering=0) as f:
            f.seek(begin)
            while length > 0:
                n = f.readinto(memoryview(buffer)[:min(length, len(buffer))])
                if not n:
                    break
                length -= n
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--bits", type=float, default=2.0, help="the codebook fit's budget (bits per weight)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--clean", action="store_true", help="delete DIR at the end")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from embzip.checkpoint import find_checkpoint

    args.dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ckpt_dir = build_checkpoint(args.dir / "checkpoint", args.shape)
    built = time.perf_counter() - start
    ckpt = find_checkpoint(ckpt_dir)
    key = "model.embed_tokens.weight"
    data_start, header = ckpt.header(ckpt.weight_map[key])
    begin, end = header[key]["data_offsets"]
    emb_bytes = end - begin
    files = [ckpt_dir / f for f in ckpt.files]
    rows = []
    read_emb = plain_read([], [(ckpt_dir / ckpt.weight_map[key], data_start + begin, emb_bytes)])
    cmd = [sys.executable, "-m", "embzip"]
    factors, out = args.dir / "factors.safetensors", args.dir / "out"
    runs = [("svd", [*cmd, "svd", str(ckpt_dir), "--rank", str(args.rank), "-o", str(factors), "-f", "-q"],
             read_emb),
            ("fit --method wsvd", [*cmd, "fit", str(ckpt_dir), "--method", "wsvd", "--rank", str(args.rank),
                                   "-o", str(args.dir / "wsvd.safetensors"), "-f", "-q"], read_emb),
            (f"fit --bits {args.bits:g}", [*cmd, "fit", str(ckpt_dir), "--bits", f"{args.bits:g}",
                                          "-o", str(args.dir / "codebook.safetensors"), "-f", "-q"], read_emb)]
    for name, argv, reference in runs:
        rows.append({"command": name, **measure(argv), "plain_read_seconds": reference})
    read_all = plain_read(files)
    rows.append({"command": "apply", **measure([*cmd, "apply", str(ckpt_dir), str(factors), "-o", str(out), "-f",
                                                "-q"]), "plain_read_seconds": read_all})
    shutil.rmtree(out, ignore_errors=True)
    rows.append({"command": "apply --dense", **measure([*cmd, "apply", str(ckpt_dir), str(factors), "-o", str(out),
                                                        "--dense", "-f", "-q"]), "plain_read_seconds": read_all})
    shutil.rmtree(out, ignore_errors=True)
    for row in rows:
        row["peak_over_embedding"] = row["peak_rss"] / emb_bytes
    result = {"shape": args.shape, "checkpoint_bytes": ckpt.nbytes(), "embedding_bytes": emb_bytes,
              "shards": len(files), "build_seconds": built, "rank": args.rank, "bits": args.bits, "rows": rows}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.shape}: checkpoint {ckpt.nbytes() / 1e9:.2f} GB in {len(files)} shards, embedding "
              f"{emb_bytes / 1e9:.3f} GB, rank {args.rank}, codebook {args.bits:g} bits per weight")
        print("| command | peak RSS (GB) | peak / embedding | seconds | plain read of the same bytes (s) |")
        print("|---|---|---|---|---|")
        for row in rows:
            print(f"| `{row['command']}` | {row['peak_rss'] / 1e9:.2f} | {row['peak_over_embedding']:.2f} | "
                  f"{row['seconds']:.1f} | {row['plain_read_seconds']:.1f} |")
    if args.clean:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
