"""Tiny real models built from a config, saved once per test session. No hub access."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

WORDS = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
    "hot word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two "
    "has look more day could go come did number sound no most people my over know water than call first who "
    "may down side been now find . ,"
).split()

TEXT = (
    "the people who write about water said that it was hot .\n"
    "he will look at the number of words in each sound and then call them one by one .\n"
    "she can find more time for the first thing she has to do , if she will come down .\n"
    "they had been over there for two day and did not know what to make of it .\n"
    "how many of them would like to see his long way home , which is now the most hot side .\n"
    "we use this word for all of your people , but some were out when you come .\n"
) * 4


# A WordPiece vocabulary (BERT's rules: lowercased, split at punctuation) with entries its tokenizer can never
# produce: [unused0] and [unused1] (the brackets split them), ##! and ##. (punctuation never sits inside a
# word), ... (split into three dots) and Hot (capitals are lowercased).
NEVER = ["[unused0]", "[unused1]", "##!", "##.", "...", "Hot"]


def wordpiece_tokenizer():
    """A BERT-style WordPiece tokenizer over WORDS, a few ## pieces, and the entries of NEVER."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + NEVER[:2] + WORDS + ["##s", "##ed", "##ing"] + NEVER[2:])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def _tokenizer(kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "wordpiece":
        return wordpiece_tokenizer()

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if kind == "bert" else ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def build_tiny(kind: str, path, dtype: str = "float32") -> str:
    """Save a tiny model of `kind` (bert-mlm, bert-encoder, bert-wordpiece: an encoder whose WordPiece vocabulary
    holds tokens it never produces, gpt2, llama with a tied head, llama-untied, roberta, mobilebert: a masked LM whose head
    reads the tied matrix as `.weight`) with its tokenizer to `path`.

    The weights are made in float32 and saved in `dtype` (float32, bfloat16 or float16), as a checkpoint
    published in that dtype would be.
    """
    import torch
    import transformers as tf

    torch.manual_seed(0)
    tokenizer = _tokenizer("wordpiece" if kind == "bert-wordpiece" else "bert"
                           if kind.startswith("bert") or kind in ("roberta", "mobilebert") else "causal")
    n = len(tokenizer)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "bert-mlm":
        model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=n, max_position_embeddings=64, **common))
    elif kind in ("bert-encoder", "bert-wordpiece"):
        model = tf.BertModel(tf.BertConfig(vocab_size=n, max_position_embeddings=64, **common))
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=n, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                                 bos_token_id=2, eos_token_id=3))
    elif kind in ("llama", "llama-untied"):  # tied or not, with embedding rows padded beyond the tokenizer's length
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=n + 7, num_key_value_heads=1,
                                                   tie_word_embeddings=kind == "llama", max_position_embeddings=64,
                                                   bos_token_id=2, eos_token_id=3, pad_token_id=0, **common))
    elif kind == "roberta":  # position ids start after the padding index: 34 - 0 - 1 = 33 usable positions
        model = tf.RobertaForMaskedLM(tf.RobertaConfig(vocab_size=n, max_position_embeddings=34, pad_token_id=0,
                                                       bos_token_id=2, eos_token_id=3, **common))
    elif kind == "mobilebert":  # a masked LM whose head reads its decoder's `.weight` instead of calling it
        model = tf.MobileBertForMaskedLM(tf.MobileBertConfig(
            vocab_size=n, embedding_size=16, max_position_embeddings=64, intra_bottleneck_size=16,
            true_hidden_size=16, num_feedforward_networks=1, pad_token_id=0, **common))
    else:
        raise ValueError(kind)
    # Random init gives near-isotropic rows; give the embedding some structure so low ranks matter.
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        basis = torch.randn(6, emb.shape[1])
        emb.copy_(torch.randn(emb.shape[0], 6) @ basis * 0.3 + 0.05 * torch.randn_like(emb))
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(kind, dtype="float32") -> directory of a tiny saved model, built once per session."""
    built: dict[tuple[str, str], str] = {}

    def get(kind: str, dtype: str = "float32") -> str:
        if (kind, dtype) not in built:
            name = kind if dtype == "float32" else f"{kind}-{dtype}"
            built[kind, dtype] = build_tiny(kind, tmp_path_factory.mktemp(name), dtype)
        return built[kind, dtype]

    return get


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Each test its own embzip cache, outside its tmp_path (a cache is not an output: tests that check a failed
    command wrote nothing look there): nothing is read from or written to the user's ~/.cache/embzip, and no test
    sees samples another test cached."""
    monkeypatch.setenv("EMBZIP_CACHE", str(tmp_path_factory.mktemp("embzip-cache")))


@pytest.fixture(autouse=True)
def _fresh_logger():
    """Each test starts with the "embzip" logger as the library leaves it: a CLI command run in-process gives it a
    rich handler and stops it propagating, which would hide later tests' warnings from `caplog`."""
    import logging

    logger = logging.getLogger("embzip")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:], logger.propagate = [], True
    logger.setLevel(logging.NOTSET)
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[2]
    logger.setLevel(saved[1])
