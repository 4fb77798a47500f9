"""`int4`: groups of --group-size numbers with scale and offset, packed two per byte (quant.py)."""

import torch

from ..compressed import storage_dtype
from ..errors import OptionError
from ..quant import Quantized, check_group, quantize_int4
from .base import FIXED, Method, register


def bits(vocab, hidden, dtype, recipe):
    check_group(hidden, recipe.group, OptionError)  # here an option value (--group-size), not a file's contents
    return 4 + 2 * torch.finfo(storage_dtype(dtype)).bits / recipe.group


def make(inputs, size, recipe):
    return Quantized(quantize_int4(inputs.embedding, recipe.group)), {}


METHOD = register(Method("int4", "quant", FIXED, "int4 in groups with scale and offset (5 bits per weight at "
                         "group 32)", make, fixed_bits=bits, options=("group_size",),
                         file_label=lambda recipe: "int4" if recipe.group == 32 else f"int4g{recipe.group}"))
