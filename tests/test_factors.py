import json

import pytest
import torch

from embzip.errors import FactorsError, OutputError
from embzip.factors import Factors, load_factors, reconstruction_metrics, save_factors


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


def test_foreign_safetensors_and_garbage_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(FactorsError, match="not embzip factors"):
        load_factors(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(FactorsError, match="not a safetensors file"):
        load_factors(tmp_path / "junk.safetensors")


def test_shapes_that_do_not_chain_are_refused():
    with pytest.raises(FactorsError, match="do not chain"):
        Factors(torch.zeros(5, 3), torch.zeros(4, 8))
