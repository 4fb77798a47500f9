"""Quantized and codebook embeddings: the maths, the stored sizes, and the factors file round trip."""

import json
import re

import pytest
import torch

from embzip import models

from embzip.compressed import storage_dtype
from embzip.errors import FactorsError
from embzip.factors import Factors, load_factors, save_factors
from embzip.quant import Quantized, pack_int4, quantize_int4, quantize_int8, unpack_int4


def _matrix(dtype=torch.float32, vocab=300, hidden=64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(vocab, hidden, generator=g) * torch.rand(vocab, 1, generator=g)).to(dtype)


def test_int4_packing_round_trips_every_value():
    q = torch.arange(16, dtype=torch.uint8).repeat(3, 2)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_rounds_to_the_nearest_stored_level(dtype):
    e = _matrix(dtype)
    q = Quantized(quantize_int8(e))
    scale = q.tensors()["scale"].float()
    assert q.tensors()["q8"].dtype == torch.int8 and scale.dtype == torch.float32
    assert q.tensors()["scale"].dtype == storage_dtype(dtype)
    error = (q.reconstruct() - e.float()).abs()
    assert (error <= scale.unsqueeze(1) / 2 + 1e-6).all()  # never more than half a step
    assert q.bits_per_weight() == pytest.approx(8 + 16 / 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_groups_have_scale_and_offset_and_five_bits(dtype):
    e = _matrix(dtype)
    q = Quantized(quantize_int4(e, group=32))
    t = q.tensors()
    assert t["q4"].shape == (300, 32) and t["scale"].shape == t["offset"].shape == (300, 2)
    step = t["scale"].float().repeat_interleave(32, dim=1)
    error = (q.reconstruct() - e.float()).abs()
    assert (error <= step / 2 + 1e-5).all()
    assert q.bits_per_weight() == pytest.approx(5.0) and q.group == 32
    # fewer bits, more error than int8
    assert error.mean() > (Quantized(quantize_int8(e)).reconstruct() - e.float()).abs().mean()


def test_int4_refuses_a_group_that_does_not_divide_the_row():
    with pytest.raises(FactorsError, match="does not split the embedding.s width 64"):
        quantize_int4(_matrix(), group=24)


def test_decode_takes_any_index_shape():
    q = Quantized(quantize_int4(_matrix()))
    ids = torch.tensor([[3, 5, 7], [1, 1, 299]])
    assert torch.equal(q.rows(ids), q.reconstruct()[ids])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_file_round_trip_keeps_compact_dtypes(tmp_path, kind):
    e = _matrix(torch.bfloat16)
    q = Quantized(quantize_int8(e) if kind == "int8" else quantize_int4(e), {"method": kind})
    path = save_factors(q, tmp_path / "q.safetensors")
    back = load_factors(path)
    assert type(back) is Quantized and back.kind == "quant"
    for name, t in q.tensors().items():
        assert torch.equal(t, back.tensors()[name]) and t.dtype == back.tensors()[name].dtype
    assert back.meta["bits_per_weight"] == pytest.approx(q.bits_per_weight())
    # the file is the stored bytes plus a small header
    assert q.stored_bytes() < path.stat().st_size < q.stored_bytes() + 4096


def test_version_1_files_still_load(tmp_path):
    from safetensors.torch import save_file

    f = Factors(torch.randn(10, 2), torch.randn(2, 4))
    meta = {"method": "svd", "rank": 2, "shape": [10, 4]}
    save_file(f.tensors(), tmp_path / "v1.safetensors",
              metadata={"format": "embzip.factors", "format_version": "1", "embzip": json.dumps(meta)})
    back = load_factors(tmp_path / "v1.safetensors")
    assert isinstance(back, Factors) and torch.equal(back.codes, f.codes)


def _float_tables(path, out, version):
    """A copy of a codebook factors file as versions 2 and 3 wrote it: the transform and codebooks as 16-bit
    floats (no '.scale' tensors), the metadata's tensor claims to match."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from embzip.codebook import dequantized

    with safe_open(str(path), "pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    old = {k: (dequantized(tensors, k).half() if k + ".scale" in tensors else t)
           for k, t in tensors.items() if not k.endswith(".scale")}
    meta = json.loads(header["embzip"])
    meta["tensors"] = {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in old.items()}
    meta["format_version"] = int(version)  # the header and the metadata say the same version, as every writer did
    save_file(old, out, metadata={**header, "format_version": version, "embzip": json.dumps(meta)})
    return out


def test_codebook_files_of_versions_2_to_4_still_load_and_version_5_stores_int8_tables(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from embzip.codebook import Codebook, CodebookConfig, fit_codebook

    e = _matrix(vocab=2000, hidden=32)
    config = dict(bits=2, centroids=16, sample=1024, iterations=2)
    written = Codebook(fit_codebook(e, config=CodebookConfig(focus=0.3, **config)))
    focused = save_factors(written, tmp_path / "v5.safetensors")
    with safe_open(str(focused), "pt") as f:
        assert f.metadata()["format_version"] == "5" and any(k.endswith(".rows") for k in f.keys())
        assert f.get_tensor("transform").dtype == torch.int8 and f.get_tensor("stage0.codebook").dtype == torch.int8
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert torch.equal(load_factors(focused).reconstruct(), written.reconstruct())
    # version 4 wrote the same tensors (version 5 adds 'absent' rows, which this fit has none of)
    meta = {**json.loads(header["embzip"]), "format_version": 4}
    save_file(tensors, tmp_path / "v4.safetensors", metadata={**header, "format_version": "4", "embzip": json.dumps(meta)})
    assert torch.equal(load_factors(tmp_path / "v4.safetensors").reconstruct(), written.reconstruct())
    # version 3 (a focus stage, 16-bit tables) and version 2 (no focus stage): the same rows up to float16 rounding
    v3 = load_factors(_float_tables(focused, tmp_path / "v3.safetensors", "3"))
    assert isinstance(v3, Codebook) and v3.tensors()["transform"].dtype == torch.float16
    assert torch.allclose(v3.reconstruct(), written.reconstruct(), rtol=0, atol=2e-3 * e.abs().max().item())
    plain = save_factors(Codebook(fit_codebook(e, config=CodebookConfig(focus=0, **config))), tmp_path / "p.safetensors")
    v2 = load_factors(_float_tables(plain, tmp_path / "v2.safetensors", "2"))
    assert torch.allclose(v2.reconstruct(), load_factors(plain).reconstruct(), rtol=0, atol=2e-3 * e.abs().max().item())


def _rewrite(tmp_path, tensors, meta, version="2"):
    from safetensors.torch import save_file

    path = tmp_path / "lie.safetensors"
    save_file(tensors, path, metadata={"format": "embzip.factors", "format_version": version,
                                       "embzip": meta if isinstance(meta, str) else json.dumps(meta)})
    return path


@pytest.mark.parametrize("tensors,meta,fragment", [
    ({"codes": torch.zeros(10, 2, dtype=torch.int8), "decoder": torch.zeros(2, 4)}, {}, "expected a float dtype"),
    ({"codes": torch.zeros(10, 2, dtype=torch.bool), "decoder": torch.zeros(2, 4)}, {}, "expected a float dtype"),
    ({"codes": torch.zeros(10, 0), "decoder": torch.zeros(0, 4)}, {}, "rank must be at least 1"),
    ({"codes": torch.zeros(10, 2), "decoder": torch.zeros(2, 4)}, {"rank": 3}, "claims rank 3"),
    ({"codes": torch.zeros(10, 2), "decoder": torch.zeros(2, 4)}, {"shape": [11, 4]}, "claims shape"),
    ({"codes": torch.zeros(10, 2), "decoder": torch.zeros(2, 4)}, {"kind": "quant"}, "quantized tensors must be"),
    ({"codes": torch.zeros(10, 2), "decoder": torch.zeros(2, 4)}, {"kind": "zip"}, "unknown compressed kind"),
    ({"codes": torch.full((10, 2), float("nan")), "decoder": torch.zeros(2, 4)}, {}, "NaN or Inf"),
    ({"q8": torch.zeros(10, 4), "scale": torch.ones(10)}, {"kind": "quant"}, "inconsistent"),
    ({"codes": torch.zeros(10, 2), "decoder": torch.zeros(2, 4)}, "[1, 2]", "a JSON list"),
    ({"codes": torch.zeros(10, 2), "decoder": torch.zeros(2, 4)}, "{not json", "not JSON"),
    ({"codes": torch.zeros(10, 2), "decoder": torch.zeros(2, 4)}, {"source": "x"}, "'source' is a str"),
])
def test_a_file_that_lies_is_refused_in_one_line(tmp_path, tensors, meta, fragment):
    path = _rewrite(tmp_path, tensors, meta)
    with pytest.raises(FactorsError, match=fragment):
        load_factors(path)


def test_a_non_integer_version_is_refused(tmp_path):
    path = _rewrite(tmp_path, {"codes": torch.zeros(3, 1), "decoder": torch.zeros(1, 2)}, {}, version="1.0")
    with pytest.raises(FactorsError, match="not an integer"):
        load_factors(path)


def test_non_finite_results_are_never_written(tmp_path):
    q = Quantized({"q8": torch.zeros(4, 8, dtype=torch.int8), "scale": torch.tensor([1.0, float("inf"), 1, 1])})
    with pytest.raises(FactorsError, match="NaN or Inf"):
        save_factors(q, tmp_path / "q.safetensors")
    assert not list(tmp_path.iterdir())


def _head(tensors, dtype=torch.float32):
    from embzip.splice import CompressedEmbedding, CompressedHead

    return CompressedHead(CompressedEmbedding(Quantized(tensors), dtype=dtype), None)


@pytest.mark.parametrize("bf16_units", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme, vocab, group", [("int8", 100, None), ("int4", 112, 32), ("int4", 100, 64)])
def test_few_states_go_through_a_fused_kernel_that_agrees_with_decoding(scheme, vocab, group, dtype, bf16_units,
                                                                        monkeypatch):
    """Few float32 hidden states or any 16-bit ones on a CPU: torch's fused kernel (bf16 in and out), within a
    bf16 step of the largest logit of the float32 product with the decoded rows; a vocabulary not a multiple of
    16 is padded for the int4 kernel and the padding dropped."""
    import embzip.quant as quant

    monkeypatch.setattr(models, "native_bf16", lambda: bf16_units)
    e = _matrix(dtype, vocab=vocab, hidden=128)
    tensors = quantize_int8(e) if scheme == "int8" else quantize_int4(e, group=group)
    hidden = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = hidden.float() @ Quantized.decode(tensors, slice(None)).T
    got = Quantized.head_logits(tensors, hidden)
    # float32 states get float32 logits, 16-bit ones logits in their own dtype (never a float32 copy as well)
    assert got is not None and got.shape == (2, 3, vocab) and got.dtype == dtype
    got = got.float()
    tol = 2**-7 * expected.abs().max().item()
    assert torch.allclose(got, expected, atol=tol)
    assert not torch.allclose(got, hidden.float() @ e.float().T, atol=tol / 8)  # the stored integers, not the matrix
    # through the head module, in the model's dtype
    assert torch.allclose(_head(tensors, dtype)(hidden).float(), expected, atol=2 * tol)
    # the last position of a batch, as generate() passes it: a view that is not contiguous
    last = Quantized.head_logits(tensors, hidden[:, -1:])
    assert last is not None and torch.equal(last, Quantized.head_logits(tensors, hidden[:, -1:].contiguous()))
    # many float32 states, or bfloat16 ones on a CPU with bfloat16 units: decoding blocks of rows into one product
    # is faster there, and the head does that; other 16-bit ones still go to the kernel (a 16-bit product is slower
    # on a CPU without 16-bit arithmetic, and float16 products are slow on both)
    many = torch.randn(quant._FUSED_STATES[scheme] + 1, 128).to(dtype)
    decoded = dtype == torch.float32 or (dtype == torch.bfloat16 and bf16_units)
    assert (Quantized.head_logits(tensors, many) is None) == decoded
    want = many.float() @ Quantized.decode(tensors, slice(None)).T  # and the head's logits are right either way
    assert torch.allclose(_head(tensors, dtype)(many).float(), want, atol=2 * 2**-7 * want.abs().max().item())


def test_the_fused_kernels_are_not_used_where_they_cannot_serve():
    e = _matrix(hidden=128)
    hidden = torch.randn(3, 128)
    assert Quantized.head_logits(quantize_int4(e, group=16), hidden) is None  # a group size the kernel lacks
    # a hidden size not a multiple of 16: the int8 kernel would read past the rows (garbage logits, or a
    # segfault); the head decodes them instead and gets the right logits, in float32 and bf16
    for width, dtype in ((40, torch.float32), (24, torch.bfloat16)):
        odd = quantize_int8(_matrix(dtype, hidden=width))
        states = torch.randn(2, width).to(dtype)
        assert Quantized.head_logits(odd, states) is None
        expected = states.float() @ Quantized.decode(odd, slice(None)).T
        assert torch.allclose(_head(odd, dtype)(states).float(), expected, atol=2**-7 * expected.abs().max().item())
    wants_grad = hidden.clone().requires_grad_()
    assert Quantized.head_logits(quantize_int8(e), wants_grad) is None  # the kernels have no backward
    # the head then decodes rows, and gradients flow
    head, tensors = _head(quantize_int8(e)), quantize_int8(e)
    head(wants_grad).sum().backward()
    assert torch.allclose(wants_grad.grad, Quantized.decode(tensors, slice(None)).sum(0).expand(3, -1), atol=1e-5)
    with torch.no_grad():
        assert Quantized.head_logits(quantize_int8(e), wants_grad) is not None


def test_the_int4_kernel_layout_is_derived_once_per_head_and_again_when_its_tensors_change(monkeypatch):
    import embzip.quant as quant

    made = []
    original = quant.int4_kernel_operands
    monkeypatch.setattr(quant, "int4_kernel_operands", lambda t: made.append(1) or original(t))
    head = _head(quantize_int4(_matrix(hidden=64), group=32))
    hidden = torch.randn(4, 64)
    with torch.no_grad():
        first = head(hidden)
        assert torch.equal(head(hidden), first) and len(made) == 1
        head.embedding.scale.mul_(2)  # the stored scales change in place: derived again, never stale
        doubled = head(hidden)
    assert len(made) == 2
    offsets = hidden @ head.embedding.offset.float().repeat_interleave(32, dim=1).T
    assert torch.allclose(doubled, 2 * first - offsets, atol=2**-6 * doubled.abs().max().item())
    assert not any("kept" in name or "derived" in name for name in head.state_dict())


@pytest.mark.parametrize("hidden, sizes", [(30, "2, 6, 10, 30"), (40, "2, 4, 8, 10, 20, 40")])
def test_a_group_size_that_does_not_fit_names_the_ones_that_do(hidden, sizes):
    from embzip.errors import FactorsError
    from embzip.quant import check_group

    with pytest.raises(FactorsError, match=f"into groups of an even size; use one of {re.escape(sizes)}$"):
        check_group(hidden, 32)


@pytest.mark.parametrize("group", [32, 37, 2])
def test_an_odd_width_is_refused_for_what_it_is_whatever_the_group(group):
    from embzip.errors import FactorsError
    from embzip.quant import check_group

    with pytest.raises(FactorsError, match=r"the embedding's width 37 \(its rows' length\) is odd: no group size fits "
                                           r"it; use int8 or a codebook$"):
        check_group(37, group)


@pytest.mark.parametrize("group", ["16", 16.0, True])
def test_a_group_size_that_is_not_an_integer_is_refused(group):
    from embzip.errors import FactorsError
    from embzip.quant import check_group

    with pytest.raises(FactorsError, match="int4 group size must be an integer"):
        check_group(32, group)


@pytest.mark.parametrize("scale_of_values,int8_dtype", [(1e-6, torch.bfloat16), (1e5, torch.float16)])
def test_values_float16_cannot_hold_are_stored_in_bfloat16_at_the_same_bits(scale_of_values, int8_dtype):
    """A float32 embedding's scales go to float16, unless float16 would lose them: values near 1e-6 gave int8
    scales of 2.5e-8, which float16 rounds to 0 (every row decoded to zero, no error); values near 1e5 overflow
    an int4 offset (int8's scales, a 127th of them, still fit). bfloat16 has float32's range in the same 16 bits."""
    e = torch.randn(300, 64) * scale_of_values
    for quantize, bits, dtype in [(quantize_int8, 8.25, int8_dtype), (quantize_int4, 5.0, torch.bfloat16)]:
        q = Quantized(quantize(e))
        assert q.dtype == dtype and q.bits_per_weight() == pytest.approx(bits)
        error = (q.reconstruct() - e).norm() / e.norm()
        assert error < (0.01 if quantize is quantize_int8 else 0.1)
    assert Quantized(quantize_int8(torch.randn(300, 64))).dtype == torch.float16  # ordinary values: as before


def test_the_storage_dtype_follows_the_values_only_for_a_32_bit_embedding():
    ordinary, tiny, huge = torch.randn(100), torch.randn(100) * 1e-7, torch.randn(100) * 1e6
    assert storage_dtype(torch.float32, ordinary) is torch.float16
    assert storage_dtype(torch.float32, ordinary, tiny) is torch.bfloat16
    assert storage_dtype(torch.float32, huge) is torch.bfloat16
    assert storage_dtype(torch.float32, torch.zeros(5), torch.tensor([]), torch.arange(3)) is torch.float16
    assert storage_dtype(torch.float16, tiny) is torch.float16 and storage_dtype(torch.bfloat16) is torch.bfloat16
    one_small_value = torch.cat([torch.randn(1000), torch.tensor([1e-7])])  # a decoder's near-zero entry: harmless
    assert storage_dtype(torch.float32, one_small_value) is torch.float16


def test_a_zero_row_rebuilt_as_zero_counts_as_kept():
    from embzip.compressed import reconstruction_metrics

    e = torch.randn(300, 64)
    e[::3] = 0  # a third of the rows are zero (unused tokens), and int8 rebuilds them exactly
    metrics = reconstruction_metrics(e, Quantized(quantize_int8(e)))
    assert metrics["cosine_distance"] < 1e-4  # it was 0.33: cos(0, 0) taken as 0


def test_low_rank_factors_of_large_values_are_stored_in_bfloat16_not_overflowed():
    """svd codes of rows with norms near 1e6 pass float16's 65504: stored as bfloat16 they stay finite (the fit was
    refused with 'NaN or Inf ... check the method's options')."""
    from embzip.svd import svd_factors

    e = torch.randn(300, 64) @ torch.randn(64, 64) * 3e4
    factors = svd_factors(e, 16).stored_as(torch.float32)
    assert factors.dtype == torch.bfloat16 and torch.isfinite(factors.reconstruct()).all()
    assert svd_factors(e / 3e4, 16).stored_as(torch.float32).dtype == torch.float16


def test_a_few_tiny_rows_among_ordinary_ones_keep_their_int8_scales():
    """Judging the scales as a whole let the ordinary rows outvote a few tiny ones (reserved tokens): those rows'
    scales rounded to a float16 zero and decoded to zeros. Each scale is judged on its own."""
    from embzip.compressed import row_cosine_distance

    e = torch.randn(1000, 64) * 0.05
    e[:50] *= 2e-5
    q = Quantized(quantize_int8(e))
    assert q.dtype == torch.bfloat16
    assert row_cosine_distance(q.reconstruct()[:50], e[:50]).max() < 1e-3


def test_factors_stored_at_16_bits_already_are_not_judged_again():
    from embzip.svd import svd_factors

    made = svd_factors(torch.randn(300, 64), 8)
    for dtype in (torch.float16, torch.bfloat16):
        stored = made.to(dtype=dtype)
        assert stored.stored_as(torch.float32) is stored  # apply of a factors file: its dtype was chosen when made
        assert stored.stored_as(torch.bfloat16).dtype == torch.bfloat16  # a 16-bit model's own dtype, as before
