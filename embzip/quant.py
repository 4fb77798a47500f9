"""Plain quantization of the embedding: the baselines every codebook method must beat.

- int8 (``q8``): each row scaled by its largest magnitude (one scale per row), rounded to the
  nearest of the 255 levels -127..127. 8 bits per weight plus one 16-bit scale per row.
- int4 (``q4``): each row cut into groups of `group` consecutive numbers; each group stores its
  minimum (offset) and step (scale), and every number is rounded to the nearest of 16 levels
  offset + scale * q, q = 0..15, packed two per byte (low nibble first). 4 bits per weight plus
  two 16-bit numbers per group: 5.0 bits per weight at group 32.

Scales and offsets are stored in the embedding's dtype when it is 16-bit, else float16
(compressed.storage_dtype), and rounding uses the stored (rounded) scale and offset, so decoding
gives exactly the nearest level of the grid that is stored. Work is done in row chunks.

A tied head kept in this form decodes blocks of rows and multiplies (splice.CompressedHead), except
on a CPU for few float32 hidden states (a generation step) or any number of 16-bit ones: there
`head_logits` hands the stored integers to
torch's fused weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), which read
each integer once and never build a float row. They take bfloat16 hidden states and return bfloat16
logits, so a float32 model's step loses a little precision there (docs/method.md); the int4 kernel
wants its own layout of the nibbles, derived once per head and kept beside the stored tensors.
"""

from __future__ import annotations

import torch

from .compressed import TensorSet, may_train, register, step_shortcuts, storage_dtype
from .errors import FactorsError
from .models import fast_product, sixteen_bit

Q8, Q4, SCALE, OFFSET = "q8", "q4", "scale", "offset"
_CHUNK_ROWS = 16384
# Most float32 hidden states the fused kernels take: beyond, decoding blocks of rows and one float32 product is
# faster (Gemma-3-270M on the 2-core CPU, the head alone: int8 32 states 0.19 s fused against 0.24 s, 64 states
# 0.37 s against 0.31 s; int4 64 states 0.33 s against 0.50 s). So do bfloat16 states on a CPU with bfloat16 units,
# where decoding into a bfloat16 product is as much faster (AMD EPYC, AVX-512 BF16: int8 64 states 0.095 s fused
# against 0.062 s, 256 states 0.38 s against 0.16 s; int4 128 states 0.156 s against 0.143 s, 256 states 0.32 s
# against 0.21 s). Other 16-bit states take them at any count: a 16-bit product is slow on a CPU without 16-bit
# arithmetic, as on the AVX2 machine (256 bf16 states: int8 fused 1.47 s, decoding rows 6.0 s, the dense bf16
# product 5.8 s; int4 1.37 s), and float16 products are slow on both
_FUSED_STATES = {"int8": 32, "int4": 64}
_INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm_for_cpu takes
_INT4_KERNEL_ROWS = 16  # and its rows come in multiples of this


def _chunks(n: int):
    return (slice(i, i + _CHUNK_ROWS) for i in range(0, n, _CHUNK_ROWS))


def quantize_int8(embedding: torch.Tensor) -> dict[str, torch.Tensor]:
    """One absmax scale per row, int8 levels -127..127."""
    vocab, hidden = embedding.shape
    exact = torch.cat([embedding[rows].float().abs().amax(dim=1) / 127 for rows in _chunks(vocab)])
    scales = exact.clamp_min(1e-30).to(storage_dtype(embedding.dtype, scales=(exact,)))  # bfloat16 where float16 loses
    qs = torch.empty(vocab, hidden, dtype=torch.int8)  # filled in place: no second copy of the result
    for rows in _chunks(vocab):
        x = embedding[rows].float()
        qs[rows] = torch.round(x / scales[rows].float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return {Q8: qs, SCALE: scales}


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 (last dim even) -> uint8 bytes, two per byte, low nibble first."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 bytes -> values 0..15 (uint8), twice as many along the last dim."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def quantize_int4(embedding: torch.Tensor, group: int = 32) -> dict[str, torch.Tensor]:
    """Per group of `group` numbers: offset (min) and scale ((max - min) / 15), 16 levels."""
    vocab, hidden = embedding.shape
    check_group(hidden, group)
    low, high = (torch.empty(vocab, hidden // group) for _ in range(2))  # float32 first: they choose the dtype
    for rows in _chunks(vocab):
        x = embedding[rows].float().view(-1, hidden // group, group)
        low[rows], high[rows] = x.amin(dim=2), x.amax(dim=2)
    dtype = storage_dtype(embedding.dtype, low, scales=((high - low) / 15,))  # bfloat16 where float16 loses them
    packed = torch.empty(vocab, hidden // 2, dtype=torch.uint8)  # filled in place, as in quantize_int8
    scales, offsets = (torch.empty(vocab, hidden // group, dtype=dtype) for _ in range(2))
    for rows in _chunks(vocab):
        x = embedding[rows].float().view(-1, hidden // group, group)
        offset = low[rows].to(dtype)
        scale = ((high[rows] - offset.float()) / 15).clamp_min(1e-30).to(dtype)
        q = torch.round((x - offset.float().unsqueeze(2)) / scale.float().unsqueeze(2)).clamp_(0, 15)
        packed[rows] = pack_int4(q.view(x.shape[0], hidden))
        scales[rows], offsets[rows] = scale, offset
    return {Q4: packed, SCALE: scales, OFFSET: offsets}


def below_int8_grid(t: torch.Tensor) -> bool:
    """Whether an int8 tensor holds -128: embzip's int8 levels run -127..127, symmetric about 0."""
    return t.dtype == torch.int8 and t.numel() > 0 and t.device.type != "meta" and int(t.min()) < -127


def check_group(hidden: int, group: int, error: type[Exception] = FactorsError) -> None:
    """Refuse an int4 group size that does not split rows of `hidden` numbers into even groups, by `error`: a
    FactorsError for a file's tensors, an OptionError for --group-size."""
    from numbers import Integral

    if isinstance(group, bool) or not isinstance(group, Integral):
        raise error(f"int4 group size must be an integer, got {group!r}")
    if group < 2 or group % 2 or hidden % group:
        if hidden % 2:
            raise error(f"int4 packs two numbers a byte, in groups of an even size, and the embedding's width {hidden} "
                        "(its rows' length) is odd: no group size fits it; use int8 or a codebook")
        sizes = [g for g in range(2, min(hidden, 256) + 1, 2) if hidden % g == 0]  # even sizes that divide it
        raise error(f"int4 group size {group} does not split the embedding's width {hidden} (its rows' length) "
                    f"into groups of an even size; use one of {', '.join(map(str, sizes))}")


@register
class Quantized(TensorSet):
    """int8 rows or int4 groups; which one is told by the tensors it holds."""

    kind = "quant"

    @classmethod
    def check(cls, tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
        names = set(tensors)
        if names == {Q8, SCALE}:
            q, scale = tensors[Q8], tensors[SCALE]
            ok = q.dtype == torch.int8 and q.ndim == 2 and tuple(scale.shape) == (q.shape[0],)
            if ok and below_int8_grid(q):
                raise FactorsError(f"q8 holds the level {int(q.min())}; int8 levels are -127..127 (docs/format.md)")
            shape = tuple(q.shape)
        elif names == {Q4, SCALE, OFFSET}:
            q, scale, offset = tensors[Q4], tensors[SCALE], tensors[OFFSET]
            ok = (q.dtype == torch.uint8 and q.ndim == 2 and scale.ndim == 2 and scale.shape == offset.shape
                  and scale.shape[0] == q.shape[0] and scale.shape[1] >= 1 and (2 * q.shape[1]) % scale.shape[1] == 0)
            shape = (q.shape[0], 2 * q.shape[1])
        else:
            raise FactorsError(f"quantized tensors must be {{q8, scale}} or {{q4, scale, offset}}, got {sorted(names)}")
        if not ok or not all(t.is_floating_point() for n, t in tensors.items() if n in (SCALE, OFFSET)):
            shapes = {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()}
            raise FactorsError(f"quantized tensors have inconsistent shapes or dtypes: {shapes}")
        if shape[0] < 1 or shape[1] < 1:
            raise FactorsError(f"quantized tensors describe an empty {shape} matrix")
        return shape

    @property
    def scheme(self) -> str:
        return "int8" if Q8 in self._tensors else "int4"

    @property
    def group(self) -> int | None:
        return None if self.scheme == "int8" else int4_group(self._tensors)

    def size_label(self) -> str:
        return self.scheme if self.scheme == "int8" else f"int4g{self.group}"

    @classmethod
    def decode(cls, tensors: dict[str, torch.Tensor], index: torch.Tensor | slice,
               derived: dict | None = None) -> torch.Tensor:
        scale = tensors[SCALE][index].float()
        if Q8 in tensors:
            return tensors[Q8][index].float() * scale.unsqueeze(-1)
        packed = tensors[Q4][index]
        q = torch.empty(*packed.shape, 2, dtype=torch.float32, device=packed.device)  # unpacked straight to float
        q[..., 0] = packed & 0x0F
        q[..., 1] = packed >> 4
        q = q.view(*scale.shape, 2 * packed.shape[-1] // scale.shape[-1])  # ... x groups x group (no rows too)
        out = torch.addcmul(tensors[OFFSET][index].float().unsqueeze(-1), q, scale.unsqueeze(-1))
        return out.flatten(-2)

    @classmethod
    def head_logits(cls, tensors: dict[str, torch.Tensor], hidden: torch.Tensor,
                    derived: dict | None = None) -> torch.Tensor | None:
        """On a CPU, the hidden states _fused gives the kernel: the fused kernel's logits (hidden.shape[:-1] +
        (V,); float32, or the hidden states' own dtype when it is 16-bit, so a long 16-bit batch's logits are
        never held in float32 as well); else None."""
        if not _fused(tensors, hidden):
            return None
        flat = hidden.reshape(-1, hidden.shape[-1]).to(torch.bfloat16).contiguous()  # generate: hidden[:, -1:]
        dtype = hidden.dtype if sixteen_bit(hidden.dtype) else torch.float32
        derived = {} if derived is None else derived
        if Q8 in tensors:
            q8, scale = tensors[Q8], tensors[SCALE]
            if dtype == torch.float32 and scale.dtype != torch.bfloat16:  # unit scales in the kernel, the stored
                if "ones" not in derived:  # float16 ones applied in float32 after (made once per head)
                    derived["ones"] = torch.ones(q8.shape[0], dtype=torch.bfloat16)
                out = torch.ops.aten._weight_int8pack_mm(flat, q8, derived["ones"]).float().mul_(scale.float())
            else:  # the scales in the kernel, in bfloat16 (a 16-bit model's logits are no finer)
                out = torch.ops.aten._weight_int8pack_mm(flat, q8, scale.to(torch.bfloat16)).to(dtype)
        else:
            if "int4pack" not in derived:
                derived["int4pack"] = int4_kernel_operands(tensors)
            packed, scales_zeros = derived["int4pack"]
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, int4_group(tensors), scales_zeros)
            out = out[:, :tensors[Q4].shape[0]].to(dtype)  # the kernel's padding rows dropped
        return out.reshape(*hidden.shape[:-1], out.shape[-1])


def int4_group(tensors: dict[str, torch.Tensor]) -> int:
    """Numbers per group of stored int4 tensors: two per packed byte, over the groups per row."""
    return 2 * tensors[Q4].shape[1] // tensors[SCALE].shape[1]


def _fused(tensors: dict[str, torch.Tensor], hidden: torch.Tensor) -> bool:
    """Whether Quantized.head_logits takes `hidden` through a fused kernel: on a CPU, few float32 states (few
    bfloat16 ones where the CPU has bfloat16 units) or any other 16-bit ones, no gradient wanted (the kernels
    have no backward), and a kernel this torch has for this layout."""
    int8 = Q8 in tensors
    states = hidden.numel() // max(1, hidden.shape[-1])
    many = fast_product(hidden.dtype, hidden.device) and states > _FUSED_STATES["int8" if int8 else "int4"]
    if hidden.device.type != "cpu" or many or may_train(hidden) or not step_shortcuts():
        return False
    if int8:  # the kernel reads rows 16 numbers at a time: another hidden size gives garbage or a segfault
        return tensors[Q8].shape[1] % 16 == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm")
    return int4_group(tensors) in _INT4_KERNEL_GROUPS and all(hasattr(torch.ops.aten, name) for name in (
        "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"))


def int4_kernel_operands(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored int4 tensors in the layout of torch's CPU int4 kernel: its packing of the nibbles (rows
    padded to a multiple of 16 with zeros), and per group a bfloat16 scale and zero point, where the kernel
    reads a number as (q - 8) * scale + zero: zero = offset + 8 * scale."""
    q = unpack_int4(tensors[Q4])
    pad = -q.shape[0] % _INT4_KERNEL_ROWS
    q = torch.nn.functional.pad(q, (0, 0, 0, pad)).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scale, offset = tensors[SCALE].float(), tensors[OFFSET].float()
    scales_zeros = torch.stack((scale.T, (offset + 8 * scale).T), dim=-1)
    scales_zeros = torch.nn.functional.pad(scales_zeros, (0, 0, 0, pad)).to(torch.bfloat16).contiguous()
    return packed, scales_zeros
