"""`int8`: one absmax scale per row, round to nearest (quant.py). About 8 bits per weight."""

import torch

from ..compressed import storage_dtype
from ..quant import Quantized, quantize_int8
from .base import FIXED, Method, register


def bits(vocab, hidden, dtype, recipe):
    return 8 + torch.finfo(storage_dtype(dtype)).bits / hidden


def make(inputs, size, recipe):
    return Quantized(quantize_int8(inputs.embedding)), {}


METHOD = register(Method("int8", "quant", FIXED, "int8 per row, absmax scale (about 8 bits per weight)", make,
                         fixed_bits=bits))
