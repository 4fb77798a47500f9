import json

import pytest
import torch

from embzip.errors import FactorsError, OutputError
from embzip.factors import Factors, load_factors, reconstruction_metrics, save_factors
from embzip.quant import Quantized


def _factors(bias=True, norms=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return Factors(torch.randn(50, 4, generator=g, dtype=dtype), torch.randn(4, 16, generator=g, dtype=dtype),
                   torch.randn(16, generator=g, dtype=dtype) if bias else None,
                   torch.rand(50, generator=g, dtype=dtype) + 0.5 if norms else None,
                   {"method": "test", "source": {"model": "x"}})


@pytest.mark.parametrize("bias,norms,dtype", [(True, False, torch.float32), (False, False, torch.bfloat16),
                                              (True, True, torch.float16)])
def test_round_trip_is_bit_exact(tmp_path, bias, norms, dtype):
    f = _factors(bias, norms, dtype)
    save_factors(f, tmp_path / "f.safetensors")
    g = load_factors(tmp_path / "f.safetensors")
    for name, t in f.tensors().items():
        assert torch.equal(t, g.tensors()[name]), name
    assert g.meta["method"] == "test" and g.meta["rank"] == 4 and g.meta["shape"] == [50, 16]
    assert g.meta["dtype"] == str(dtype).removeprefix("torch.") and g.meta["format_version"] == 5


def test_norms_are_exact_when_kept():
    f = _factors(norms=True)
    assert torch.allclose(f.reconstruct().norm(dim=1), f.norms, rtol=1e-5)


def test_metrics_are_zero_for_exact_factors():
    f = _factors()
    m = reconstruction_metrics(f.reconstruct(), f)
    assert m["rmse"] < 1e-6 and abs(m["cosine_distance"]) < 1e-6


def test_existing_output_is_refused_without_force(tmp_path):
    path = tmp_path / "f.safetensors"
    save_factors(_factors(), path)
    before = path.read_bytes()
    with pytest.raises(OutputError, match="--force"):
        save_factors(_factors(bias=False), path)
    assert path.read_bytes() == before
    save_factors(_factors(bias=False), path, force=True)
    assert load_factors(path).bias is None


def test_newer_format_version_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "future.safetensors"
    save_file({"codes": torch.zeros(3, 2), "decoder": torch.zeros(2, 4)}, path,
              metadata={"format": "embzip.factors", "format_version": "99", "embzip": json.dumps({})})
    with pytest.raises(FactorsError, match="version 99.*upgrade"):
        load_factors(path)


def test_a_header_and_metadata_that_disagree_on_the_version_are_refused(tmp_path):
    from safetensors.torch import save_file

    # the header's copy is what decides how the file is read: a metadata copy that says otherwise was edited
    path = tmp_path / "edited.safetensors"
    save_file({"codes": torch.zeros(3, 2), "decoder": torch.zeros(2, 4)}, path,
              metadata={"format": "embzip.factors", "format_version": "5", "embzip": json.dumps({"format_version": 99})})
    with pytest.raises(FactorsError, match="its header says format version 5 and its 'embzip' metadata 99"):
        load_factors(path)


def test_foreign_safetensors_and_garbage_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(FactorsError, match="not embzip factors"):
        load_factors(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(FactorsError, match="not a safetensors file"):
        load_factors(tmp_path / "junk.safetensors")


def test_a_file_holding_tensors_its_kind_does_not_define_is_refused_with_its_name(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from embzip.quant import quantize_int8

    for kind, factors in (("lowrank", Factors(torch.randn(6, 2), torch.randn(2, 4))),
                          ("quant", Quantized(quantize_int8(torch.randn(6, 4))))):
        path = tmp_path / f"{kind}.safetensors"
        save_factors(factors, path)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        meta = json.loads(metadata["embzip"])
        meta.pop("tensors", None)  # the file's claims name no tensor list: only the tensors themselves are checked
        save_file({**load_file(str(path)), "junk": torch.zeros(2)}, tmp_path / "bad.safetensors",
                  metadata={**metadata, "embzip": json.dumps(meta)})
        with pytest.raises(FactorsError, match=r"bad\.safetensors: .*junk"):
            load_factors(tmp_path / "bad.safetensors")


def test_int8_levels_outside_127_are_refused():
    from embzip.quant import quantize_int8

    tensors = quantize_int8(torch.randn(6, 4))
    tensors["q8"][0, 0] = -128
    with pytest.raises(FactorsError, match="q8 holds the level -128; int8 levels are -127..127"):  # the reason
        Quantized(tensors)


def test_shapes_that_do_not_chain_are_refused():
    with pytest.raises(FactorsError, match="do not chain"):
        Factors(torch.zeros(5, 3), torch.zeros(4, 8))


def test_save_factors_never_writes_over_the_model_they_came_from(tiny, tmp_path):
    import shutil

    from embzip import compress
    from embzip.errors import OutputError
    from embzip.factors import save_factors

    model = tmp_path / "model"
    shutil.copytree(tiny("gpt2"), model)
    factors, _ = compress(str(model), "int4", write=False)
    before = (model / "model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="is the input"):
        save_factors(factors, model / "model.safetensors", force=True)
    assert (model / "model.safetensors").read_bytes() == before
    with pytest.raises(TypeError, match="factors must be a compressed embedding .* got dict"):
        save_factors({"a": 1}, tmp_path / "f.safetensors")


@pytest.mark.parametrize("method", ["svd", "int8", "int4", "codebook"])
def test_rows_of_ids_of_any_shape_come_back_in_that_shape(tiny, method):
    import torch

    from embzip import compress
    from embzip.codebook import CodebookConfig
    from embzip.methods import Recipe

    r = Recipe(method, codebook=CodebookConfig(bits=5.0, centroids=16))
    factors, _ = compress(tiny("gpt2"), r, rank=4 if method == "svd" else None, write=False)
    ids = torch.tensor([[1, 2, 3], [7, 7, 0]])
    rows = factors.rows(ids)
    assert rows.shape == (2, 3, factors.hidden)
    assert torch.equal(rows.reshape(6, -1), factors.rows(ids.reshape(-1)))
