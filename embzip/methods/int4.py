"""`int4`: groups of --group-size numbers with scale and offset, packed two per byte (quant.py)."""

import torch

from ..compressed import storage_dtype
from ..quant import Quantized, check_group, quantize_int4
from .base import FIXED, Method, register


def bits(vocab, hidden, dtype, recipe):
    check_group(hidden, recipe.group)
    return 4 + 2 * torch.finfo(storage_dtype(dtype)).bits / recipe.group


def make(inputs, size, recipe):
    return Quantized(quantize_int4(inputs.embedding, recipe.group)), {}


METHOD = register(Method("int4", "quant", FIXED, "int4 in groups with scale and offset (5 bits per weight at "
                         "group 32)", make, fixed_bits=bits, options=("group_size",)))
