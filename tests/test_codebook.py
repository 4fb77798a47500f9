"""Codebook compression: budget, decoding, objective, weights, metric, determinism, bad settings."""

import pytest
import torch

from embzip import codebook, models
from embzip.aware import normalised_metric
from embzip.codebook import CodebookConfig, _assign, decode_rows, fit_codebook, pack, plan, stored_bits, unpack

V, D = 2000, 32
FAST = dict(centroids=16, sample=1024, iterations=3)


def _matrix(v=V, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, d, generator=g) @ torch.diag(torch.linspace(2, 0.2, d)) + 0.1


def _weights(v=V, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(v, generator=g).pow(8) * 50 + 0.05  # a few rows weigh far more than most
    return w / w.mean()


def _focus(tensors):
    """(stage number, rows) of the focus stage: the last stage, the one that codes some rows only."""
    names = [name for name in tensors if name.endswith(".rows")]
    assert len(names) == 1 and names[0] == f"stage{sum(n.endswith('.codes') for n in tensors) - 1}.rows"
    return int(names[0][5:names[0].index(".")]), tensors[names[0]]


def _error(e, tensors, w=None, metric=None):
    diff = (e.double() - decode_rows(tensors).double())
    if metric is not None:
        diff = diff @ torch.linalg.cholesky(metric.double())
    per_row = diff.pow(2).sum(1)
    return (per_row if w is None else w.double() * per_row).sum().item()


@pytest.mark.parametrize("bits, gain", [(1.5, False), (2.5, True), (3.3, False)])
@pytest.mark.parametrize("centroids", [16, 64])
def test_budget_is_met_and_nearly_filled(bits, gain, centroids):
    config = CodebookConfig(bits=bits, gain=gain, focus=0, **{**FAST, "centroids": centroids})
    tensors = fit_codebook(_matrix(), config=config)
    used = stored_bits(tensors, V, D)
    assert used <= bits * V * D
    index_bits = 4 if centroids <= 16 else 8
    # what is left cannot pay for one more index column (a byte per row with packed 4-bit indices)
    assert bits * V * D - used < 8 * V + 64 + 16 * centroids * D
    assert used == sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    codes = [t for name, t in tensors.items() if name.endswith(".codes")]
    assert all(t.dtype == torch.uint8 for t in codes)
    coarse, pieces, _ = plan(V, D, config, centroids)
    # the PQ stages' pieces, plus each coarse stage's one index in a byte of its own
    assert sum(t.shape[1] for t in codes) * 8 == sum(pieces) * index_bits + 8 * coarse
    assert [tensors[f"stage{s}.sizes"].tolist() for s in range(coarse)] == [[D]] * coarse  # one piece, whole rows


def test_decode_shape_dtype_and_row_subsets():
    e = _matrix()
    tensors = fit_codebook(e.double(), weights=_weights(), config=CodebookConfig(bits=2, focus=0.3, **FAST))
    focus = _focus(tensors)[1]  # a focus stage codes some rows only: subsets must find them
    full = decode_rows(tensors)
    assert full.shape == e.shape and full.dtype == torch.float32
    inside, outside = int(focus[3]), next(r for r in range(V) if r not in set(focus.tolist()))
    index = torch.tensor([5, 0, V - 1, 5, inside, outside, inside])
    # the same rows whatever else is decoded with them (up to float32 matmul blocking)
    assert torch.allclose(decode_rows(tensors, index), full[index], rtol=0, atol=1e-5)
    for rows in (slice(10, 20), slice(inside, inside + 1), slice(inside - 3, V), slice(0, 0), slice(0, V, 7)):
        assert torch.allclose(decode_rows(tensors, rows), full[rows], rtol=0, atol=1e-5)
    assert decode_rows(tensors, torch.tensor([], dtype=torch.long)).shape == (0, D)
    assert not torch.equal(full, e)  # it is a lossy code, not a copy


@pytest.mark.parametrize("centroids", [16, 64])
@pytest.mark.parametrize("allocation", ["variance", "equal"])
def test_decode_is_the_sum_over_stages_of_each_pieces_centroid(centroids, allocation):
    from embzip.codebook import decode_transformed

    e = _matrix()
    config = CodebookConfig(bits=6, min_piece_dim=3, allocation=allocation, focus=0.4,
                            **{**FAST, "centroids": centroids})
    tensors = fit_codebook(e, config=config)
    assert "stage1.codes" in tensors  # several stages
    last, focus = _focus(tensors)  # the last stage codes only these rows
    focus = focus.tolist()
    stages = [t.tolist() for name, t in tensors.items() if name.endswith(".sizes")]
    assert allocation == "equal" or any(len(set(sizes)) > 1 for sizes in stages)
    # equal pieces: each size's pieces side by side (decoded as slices); water-filled: interleaved (indexed)
    assert all(sizes == sorted(sizes) for sizes in stages) == (allocation == "equal")
    expected = torch.zeros(V, D)
    s = 0
    while f"stage{s}.codes" in tensors:
        levels, scale = tensors[f"stage{s}.codebook"], tensors[f"stage{s}.codebook.scale"]
        assert levels.dtype == torch.int8 and int(levels.abs().max()) <= 127 and scale.dtype == torch.float16
        book, sizes = levels.float() * scale.float(), tensors[f"stage{s}.sizes"].tolist()  # a scale per column
        codes = unpack(tensors[f"stage{s}.codes"], centroids, len(sizes))
        rows = focus if s == last else range(V)
        for at, row in enumerate(rows):
            start = 0
            for piece, size in enumerate(sizes):
                expected[row, start:start + size] += book[int(codes[at, piece]), start:start + size]
                start += size
        s += 1
    expected *= tensors["gain"].float().unsqueeze(1)
    assert torch.equal(decode_transformed(tensors), expected)
    levels, scale = tensors["transform"], tensors["transform.scale"]
    assert levels.dtype == torch.int8 and levels.shape == (D, D) and scale.shape == (D,)
    transform = levels.float() * scale.float().unsqueeze(1)  # a scale per row
    assert torch.allclose(decode_rows(tensors), expected @ transform, atol=1e-5)


def test_a_focus_stage_codes_the_rows_of_largest_weighted_error_and_pays_at_equal_bits():
    from embzip.codebook import focus_rows

    e, w = _matrix(), _weights()
    config = CodebookConfig(bits=2, focus=0.3, **FAST)  # a share whose codebook is at most a quarter of it
    focused = fit_codebook(e, weights=w, config=config)
    flat = fit_codebook(e, weights=w, config=CodebookConfig(bits=2, focus=0, **FAST))
    stage, rows = _focus(focused)
    assert not any(name.endswith(".rows") for name in flat)
    assert rows.dtype == torch.int32 and bool((rows[1:] > rows[:-1]).all()) and 16 <= len(rows) < V
    assert len(rows) == focused[f"stage{stage}.codes"].shape[0]
    used = stored_bits(focused)
    # within the budget, filled up to less than one more focus row (4 bytes of packed indices, a row number)
    assert 0 <= 2 * V * D - used < 4 * 8 + 32
    free = 2 * V * D - (used - sum(focused[f"stage{stage}.{n}"].numel() * focused[f"stage{stage}.{n}"].element_size() * 8
                                   for n in ("rows", "codes", "codebook", "codebook.scale", "sizes")))
    assert len(rows) == focus_rows(free, D, config, 16)
    # the heaviest rows are among them, and the weighted error is lower at equal bits
    assert set(torch.topk(w, 10).indices.tolist()) <= set(rows.tolist())
    assert _error(e, focused, w) < 0.9 * _error(e, flat, w)


def test_a_focus_stage_where_its_share_pays_for_its_codebook_and_as_many_rows():
    from embzip.codebook import focus_rows, split

    # Gemma-3-270M's and all-MiniLM-L6-v2's shapes: the share holds the int8 codebook (2-68% of it) and many rows
    for vocab, hidden in ((262144, 640), (30522, 384)):
        for bits in (1, 2, 4):
            base, focused = split(vocab, hidden, CodebookConfig(bits=bits), 256)
            assert focused and base.bits == pytest.approx(0.9 * bits)
    assert split(262144, 640, CodebookConfig(bits=2, focus=0), 256) == (CodebookConfig(bits=2, focus=0), False)
    # a 2000 x 32 matrix, 16 centroids: 2% of 2 bits per weight is 2560 bits, less than the 4608 of the codebook
    config = CodebookConfig(bits=2, focus=0.02, **FAST)
    assert focus_rows(0.02 * 2 * V * D, D, config, 16) == 0 and split(V, D, config, 16) == (config, False)
    assert not any(name.endswith(".rows") for name in fit_codebook(_matrix(), config=config))
    assert split(V, D, CodebookConfig(bits=2, focus=0.1, **FAST), 16)[1]  # 12800 bits: the codebook and 124 rows


@pytest.mark.parametrize("change, fragment", [
    (lambda rows: rows.long(), "int32 'rows'"),
    (lambda rows: rows.flip(0), "increasing"),
    (lambda rows: rows + V, "within the vocabulary"),
    (lambda rows: rows[1:], "one per code row"),
])
def test_a_focus_stage_with_bad_rows_is_refused(change, fragment):
    from embzip.codebook import check_tensors
    from embzip.errors import FactorsError

    tensors = fit_codebook(_matrix(), weights=_weights(), config=CodebookConfig(bits=2, focus=0.3, **FAST))
    stage, rows = _focus(tensors)
    assert check_tensors(tensors) == (V, D)
    with pytest.raises(FactorsError, match="focus stage") as info:
        check_tensors({**tensors, f"stage{stage}.rows": change(rows)})
    assert fragment.split()[0] in str(info.value)
    with pytest.raises(FactorsError, match="after a stage that codes every row"):  # not as stage 0
        check_tensors({**tensors, "stage0.rows": rows})


def test_tensors_the_format_does_not_define_and_indices_past_the_codebook_are_refused():
    from embzip.codebook import check_tensors
    from embzip.errors import FactorsError

    tensors = fit_codebook(_matrix(), weights=_weights(), config=CodebookConfig(bits=2, focus=0.3, **FAST))
    stage, _ = _focus(tensors)
    assert check_tensors(tensors) == (V, D)
    with pytest.raises(FactorsError, match="hold junk, which the format does not define"):
        check_tensors({**tensors, "junk": torch.zeros(3)})
    # the last stage renumbered past a gap would be skipped by decoding: refused instead
    gap = {(k.replace(f"stage{stage}.", f"stage{stage + 5}.") if k.startswith(f"stage{stage}.") else k): v
           for k, v in tensors.items()}
    with pytest.raises(FactorsError, match=f"stage{stage + 5}.codebook.*without a gap"):
        check_tensors(gap)
    small = {**tensors, "stage0.codebook": tensors["stage0.codebook"][:2].contiguous()}  # 16 entries -> 2
    top = int(unpack(tensors["stage0.codes"], 16, len(tensors["stage0.sizes"])).max())
    with pytest.raises(FactorsError, match=f"stage 0 has indices up to {top} but its codebook holds 2 entries"):
        check_tensors(small)
    low = tensors["transform"].clone()
    low[0, 0] = -128  # int8 tables hold levels -127..127, and the message says which level is wrong
    with pytest.raises(FactorsError, match="codebook transform holds the level -128; int8 tables use -127..127"):
        check_tensors({**tensors, "transform": low})
    book = tensors["stage0.codebook"].clone()
    book[1, 2] = -128
    with pytest.raises(FactorsError, match="stage 0's codebook holds the level -128"):
        check_tensors({**tensors, "stage0.codebook": book})


@pytest.mark.parametrize("K", [2, 16, 256])
def test_assignment_finds_the_nearest_centroid(K):
    gen = torch.Generator().manual_seed(K)
    x = torch.randn(3, 9000, 5, generator=gen) * 4  # more rows than one block of the assignment
    c = torch.randn(3, K, 5, generator=gen) * 4
    c[1, -1] = x[1, 7]  # a centroid on a row: distance 0, where rounding can go below zero
    codes = _assign(x, c)
    assert codes.shape == (3, 9000) and codes.dtype == torch.long
    dist = torch.cdist(x.double(), c.double()).pow(2)  # (3, 9000, K)
    chosen = dist.gather(2, codes.unsqueeze(2)).squeeze(2)
    best = dist.min(2).values
    # the nearest, up to ties in the last 8 of float32's 24 mantissa bits (and the rounding of |x|^2 + |c|^2)
    assert torch.all(chosen - best <= 1e-4 * (x.double().pow(2).sum(2) + 16))
    assert (codes == dist.argmin(2)).float().mean() > 0.999
    assert codes[1, 7] == K - 1


def test_pack_round_trip():
    codes = torch.randint(0, 16, (7, 5), dtype=torch.uint8)
    packed = pack(codes, 16)
    assert packed.shape == (7, 3)
    assert torch.equal(unpack(packed, 16, 5), codes)
    assert pack(codes, 256) is codes


def test_more_bits_lower_error():
    e, w = _matrix(), _weights()
    errors = [_error(e, fit_codebook(e, weights=w, config=CodebookConfig(bits=b, **FAST)), w) for b in (1.5, 2.5, 4)]
    assert errors[0] > errors[1] > errors[2]


def test_weighted_fit_beats_unweighted_on_weighted_objective():
    e, w = _matrix(), _weights()
    config = CodebookConfig(bits=2, **FAST)
    weighted = _error(e, fit_codebook(e, weights=w, config=config), w)
    plain = _error(e, fit_codebook(e, config=config), w)
    assert weighted < plain


def test_metric_is_respected():
    e = _matrix()
    s = torch.zeros(D, D, dtype=torch.float64)
    s[-1, -1] = 1.0  # the head only looks along the last (smallest-variance) coordinate
    metric = normalised_metric(s, 50.0, D)
    config = CodebookConfig(bits=2, **FAST)
    aware = fit_codebook(e, metric=metric, config=config)
    plain = fit_codebook(e, config=config)
    assert _error(e, aware, metric=metric) < _error(e, plain, metric=metric)
    last = lambda t: (decode_rows(t)[:, -1] - e[:, -1]).pow(2).sum().item()  # noqa: E731
    assert last(aware) < last(plain)


def test_a_coarse_stage_codes_clustered_rows_better_at_equal_bits():
    g = torch.Generator().manual_seed(5)
    centers = torch.randn(32, D, generator=g) * 3
    e = centers[torch.randint(0, 32, (V,), generator=g)] + _matrix(seed=6) * 0.3  # rows gather round 32 points
    config = dict(bits=3, **{**FAST, "centroids": 64})
    with_coarse = fit_codebook(e, config=CodebookConfig(coarse=1, **config))
    without = fit_codebook(e, config=CodebookConfig(coarse=0, **config))
    assert with_coarse["stage0.sizes"].tolist() == [D] and without["stage0.sizes"].numel() > 1
    assert stored_bits(with_coarse) <= 3 * V * D and stored_bits(without) <= 3 * V * D
    assert _error(e, with_coarse) < 0.8 * _error(e, without)


def test_seeded_runs_repeat_exactly_and_seeds_differ():
    e, w = _matrix(), _weights()
    a = fit_codebook(e, weights=w, config=CodebookConfig(bits=2, seed=3, **FAST))
    b = fit_codebook(e, weights=w, config=CodebookConfig(bits=2, seed=3, **FAST))
    c = fit_codebook(e, weights=w, config=CodebookConfig(bits=2, seed=4, **FAST))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(decode_rows(a), decode_rows(c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fit_in_blocks_of_rows_gives_the_factors_of_one_pass_over_all_rows(dtype, monkeypatch):
    # fit_codebook never holds a residual of every row: it assigns rows in blocks of whole _assign chunks and reads
    # 16-bit rows into float32 a block at a time. With chunks of 1024 rows, blocks of one chunk (20 of them, for a
    # coarse, a plain and a focus stage) must give every tensor of the fit that takes all rows at once, to the bit.
    e = _matrix(20000, 24).to(dtype)
    config = CodebookConfig(bits=2.0, coarse=1, **FAST)
    monkeypatch.setattr(codebook, "_assign_chunks", lambda m, K, device: (64, 1024))
    monkeypatch.setattr(codebook, "_ROWS", 2**40)
    monkeypatch.setattr(codebook, "_BLOCK", 2**40)
    whole = fit_codebook(e, weights=_weights(20000), config=config)
    monkeypatch.setattr(codebook, "_ROWS", 1)
    monkeypatch.setattr(codebook, "_BLOCK", 5000)
    blocks = fit_codebook(e, weights=_weights(20000), config=config)
    assert codebook.coarse_stages(whole) == 1 and _focus(whole)[1].numel() > 1024
    assert whole.keys() == blocks.keys()
    assert all(torch.equal(whole[name], blocks[name]) for name in whole)


def test_rows_times_is_one_matmul_of_float32_rows():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(24, 40, generator=g)
    for e in (torch.randn(20001, 24, generator=g), torch.randn(9000, 24, generator=g).to(torch.bfloat16)):
        assert torch.equal(codebook._rows_times(e, a), e.float() @ a)


def test_coarse_stages_the_budget_cannot_hold_are_left_out():
    assert plan(V, D, CodebookConfig(bits=1.5, **FAST), 16)[0] == 0  # a 2000 x 32 matrix at 1.5 bits: no room
    assert plan(V, D, CodebookConfig(bits=4, coarse=2, **FAST), 16)[0] == 2
    # the default: one below 3 bits per weight where it costs at most 3% of the budget
    assert plan(262144, 640, CodebookConfig(bits=1), 256)[0] == 1  # Gemma: 2.0%
    assert plan(262144, 640, CodebookConfig(bits=2), 256)[0] == 1  # 1.0%
    assert plan(262144, 640, CodebookConfig(bits=4), 256)[0] == 0
    assert plan(30522, 384, CodebookConfig(bits=2), 256)[0] == 0  # MiniLM: 4.4%
    assert plan(V, D, CodebookConfig(bits=2.5, **FAST), 16)[0] == 0
    assert plan(262144, 640, CodebookConfig(bits=1, coarse=2), 256)[0] == 2  # Gemma's shape


def test_a_stage_holds_at_most_d_over_min_piece_dim_pieces_and_a_focus_stage_d_over_4():
    """Fewer, wider stages for the same pieces when min_piece_dim is smaller; the focus stage keeps d / 4 pieces.
    None means 4 to fit_codebook (the codebook method passes 2 for a tied head: test_aware)."""
    assert CodebookConfig().piece_dim(tied=True) == 2 and CodebookConfig().piece_dim(tied=False) == 4
    assert CodebookConfig(min_piece_dim=3).piece_dim(tied=True) == CodebookConfig(min_piece_dim=3).piece_dim(False) == 3
    e, w = _matrix(), _weights()
    stages = {}
    for dim in (4, 2, None):
        config = CodebookConfig(bits=6, min_piece_dim=dim, focus=0.3, **FAST)
        _, pieces, focused = plan(V, D, config, 16)
        assert focused and max(pieces) <= D / (dim or 4)
        tensors = fit_codebook(e, weights=w, config=config)
        s, rows = _focus(tensors)
        assert len(tensors[f"stage{s}.sizes"]) <= D / 4 and stored_bits(tensors, V, D) <= 6 * V * D
        stages[dim] = pieces
    assert sum(stages[2]) == sum(stages[4]) and len(stages[2]) < len(stages[4]) and stages[None] == stages[4]


def test_too_few_bits_are_refused():
    with pytest.raises(ValueError, match="cannot hold"):
        fit_codebook(_matrix(), config=CodebookConfig(bits=0.01, **FAST))
    with pytest.raises(ValueError, match="give more bits$"):  # one stage: only more bits help
        plan(V, D, CodebookConfig(bits=0.01, **FAST), 16)
    # one piece a stage, 256 centroids: the pieces 4 bits pay for need more stages than their codebooks leave room
    # for (2 bits fit in one); the message names the option that helps
    with pytest.raises(ValueError, match=r"at most 1 pieces and brings its own codebook: give a smaller "
                                         r"min_piece_dim \(now 32\)"):
        plan(V, D, CodebookConfig(bits=4, min_piece_dim=32, centroids=256), 256)
    assert plan(V, D, CodebookConfig(bits=4, min_piece_dim=4, centroids=256), 256)


@pytest.mark.parametrize("field, value, fragment", [
    ("bits", 0, "bits"), ("bits", float("nan"), "bits"), ("bits", 17, "bits"), ("bits", float("inf"), "bits"),
    ("min_piece_dim", 0.5, "min_piece_dim"), ("min_piece_dim", float("nan"), "min_piece_dim"),
    ("min_piece_dim", "2", "min_piece_dim"), ("min_piece_dim", True, "min_piece_dim"), ("allocation", "random", "allocation"),
    ("centroids", 1, "centroids"), ("centroids", 257, "centroids"), ("sample", 0, "sample"),
    ("iterations", -1, "iterations"), ("coarse", -1, "coarse"), ("coarse", 1.5, "coarse"),
    ("focus", 1, "focus"), ("focus", -0.1, "focus"), ("focus", float("nan"), "focus"),
])
def test_bad_config_values_are_refused(field, value, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        CodebookConfig(**{field: value})
    assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize("centroids, coarse", [(16, 0), (64, 1), (256, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("way", ["lookup_logits", "stage_logits"])
def test_head_logits_equal_the_product_with_the_decoded_rows(centroids, coarse, dtype, way, monkeypatch):
    import embzip.codebook as codebook

    e = _matrix()
    config = CodebookConfig(bits=6, min_piece_dim=3, coarse=coarse, **{**FAST, "centroids": centroids})
    tensors = fit_codebook(e, config=config)
    assert "stage1.codes" in tensors and "gain" in tensors
    monkeypatch.setattr(codebook, "_STAGE_BLOCK", 20 * D)  # stage by stage: several blocks of 20 rows
    monkeypatch.setattr(models, "native_bf16", lambda: True)  # a CPU with bfloat16 units, as this project's
    hidden = torch.randn(2, 3, D).to(dtype)  # leading dimensions as a head sees them
    expected = hidden.float() @ decode_rows(tensors).T
    got = getattr(codebook, way)(tensors, hidden)
    sixteen = dtype == torch.bfloat16  # products in the states' dtype, as a dense bfloat16 head's
    assert got.shape == (2, 3, V) and got.dtype == (dtype if sixteen else torch.float32)
    # bfloat16 carries 8 significant bits: each product, sum and logit is rounded to 2^-9 of its size (and the
    # tables' way rounds its tables to bfloat16 for float32 states too, on a CPU with bfloat16 units)
    rounded = sixteen or way == "lookup_logits"
    assert torch.allclose(got.float(), expected, atol=(2e-2 if rounded else 1e-4) * expected.abs().max().item())
    assert getattr(codebook, way)(tensors, hidden[:, :0]).shape == (2, 0, V)  # no hidden states, no logits


@pytest.mark.parametrize("block_rows", [7, 20, V])
def test_stage_logits_add_a_focus_stage_to_its_rows_only(block_rows, monkeypatch):
    import embzip.codebook as codebook

    tensors = fit_codebook(_matrix(), config=CodebookConfig(bits=4, focus=0.3, **FAST))
    rows = [t for name, t in tensors.items() if name.endswith(".rows")]
    assert len(rows) == 1 and 0 < len(rows[0]) < V
    hidden = torch.randn(5, D)
    # blocks of a few rows: some hold focus rows, some none, and the focus rows cross block boundaries
    monkeypatch.setattr(codebook, "_STAGE_BLOCK", block_rows * (D + len(hidden)))
    blocks = {int(r) // block_rows for r in rows[0]}
    assert block_rows != 7 or len(blocks) < -(-V // block_rows)  # with blocks of 7 rows, some hold none
    expected = hidden @ decode_rows(tensors).T
    got = codebook.stage_logits(tensors, hidden)
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("way", ["lookup_logits", "stage_logits"])
def test_head_logits_backpropagate_through_many_blocks_of_rows(way, dtype, monkeypatch):
    """Healing trains the centroids through the head (and a fine-tuned model trains through it): gradients
    of both ways equal those of the product with the decoded rows, when the rows take many blocks. The
    tables' way used to re-use one index buffer for every block, which the backward pass still needed."""
    import embzip.codebook as codebook

    torch.manual_seed(0)  # the states and loss weights below: the same draw whatever ran before in the process
    stored = fit_codebook(_matrix(), config=CodebookConfig(bits=4, focus=0.3, **FAST))
    books = {n: torch.nn.Parameter(codebook.dequantized(stored, n)) for n in stored if n.endswith(".codebook")}
    tensors = {**{n: t for n, t in stored.items() if not n.endswith(".codebook.scale")}, **books}
    monkeypatch.setattr(codebook, "_BUFFER", 64)  # the tables' way: blocks of 64 rows
    monkeypatch.setattr(codebook, "_STAGE_BLOCK", 20 * D)  # the stages' way: blocks of about 20 rows
    monkeypatch.setattr(codebook, "_LOOKUP_LIMIT", 10**9 if way == "lookup_logits" else 0)
    hidden = torch.randn(3, D).to(dtype).requires_grad_()  # a bfloat16 model's head sees bfloat16 states
    weights = torch.randn(3, V)  # a loss that weighs every logit differently

    def grads(logits):
        (logits * weights).sum().backward()
        out = [hidden.grad.clone()] + [b.grad.clone() for b in books.values()]
        hidden.grad = None
        for b in books.values():
            b.grad = None
        return out

    got = grads(codebook.head_logits(tensors, hidden))
    expected = grads(hidden.float() @ decode_rows(tensors).T)
    assert len(got) == len(expected) == 1 + len(books) >= 3
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-4 * e.abs().max().item())


def test_lookup_logits_leave_many_hidden_states_to_the_stages(monkeypatch):
    import embzip.codebook as codebook

    tensors = fit_codebook(_matrix(), config=CodebookConfig(bits=2, focus=0.3, **FAST))
    pieces = codebook.row_pieces(tensors)
    full = sum(len(t) for name, t in tensors.items() if name.endswith(".sizes") and name[:-5] + "rows" not in tensors)
    assert full < pieces < sum(len(t) for name, t in tensors.items() if name.endswith(".sizes"))  # a focus stage
    monkeypatch.setattr(codebook, "_LOOKUP_LIMIT", 4 * pieces)
    assert codebook.lookup_logits(tensors, torch.randn(4, D)) is not None
    assert codebook.lookup_logits(tensors, torch.randn(5, D)) is None  # the stages are cheaper there
    assert codebook.head_logits(tensors, torch.randn(5, D)).shape == (5, V)


@pytest.mark.parametrize("magnitude", [3e-6, 1e-3, 0.3, 40.0])
def test_int8_tables_round_to_half_a_level_without_clipping(magnitude):
    from embzip.codebook import round8

    t = torch.randn(256, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * magnitude
    t[3] = -t.abs().amax(0) * 1.0001  # each column's largest value, where a scale rounded down would clip
    levels, scale = round8(t, 0)
    assert levels.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (1, 7)
    assert int(levels.abs().max()) <= 127
    error = (levels.double() * scale.double() - t).abs()
    assert torch.all(error <= scale.double() / 2 * (1 + 1e-6))  # half a level: nothing clipped
    assert torch.all(scale.double() * 127 >= t.abs().amax(0))
    # the scale is amax / 127 up to 16-bit rounding (one step of 2^-24 below float16's normal range)
    assert torch.all(scale.double() <= t.abs().amax(0) / 127 * 1.002 + 2**-24)


def _absent_fit(bits=2, focus=0.2):
    e, w = _matrix(), _weights()
    absent = torch.arange(3, V, 5)  # a fifth of the rows, never read
    config = CodebookConfig(bits=bits, focus=focus, **FAST)
    return e, w, absent, config, fit_codebook(e, weights=w, config=config, absent=absent)


def test_absent_rows_are_not_coded_and_their_bits_go_to_the_others():
    from dataclasses import replace

    from embzip.codebook import check_tensors

    e, w, absent, config, tensors = _absent_fit()
    assert stored_bits(tensors) <= 2 * V * D and check_tensors(tensors) == (V, D)
    assert tensors["absent"].dtype == torch.int32 and torch.equal(tensors["absent"].long(), absent)
    coded = torch.ones(V, dtype=torch.bool)
    coded[absent] = False
    # the other rows are coded exactly as a fit of them alone, at the budget the absent rows leave
    n = int(coded.sum())
    alone = fit_codebook(e[coded], weights=w[coded],
                         config=replace(config, bits=(2 * V * D - 32 * len(absent) - 16 * D) / (n * D)))
    assert all(torch.equal(alone[name], tensors[name]) for name in alone)
    every = fit_codebook(e, weights=w, config=config)
    assert tensors["stage0.codes"].shape[1] > every["stage0.codes"].shape[1]  # more index columns per row
    full = decode_rows(tensors)
    assert torch.equal(full[coded], decode_rows(alone))
    fill = e[absent].mean(0).half().float()
    assert torch.equal(full[absent], fill.expand(len(absent), D))
    index = torch.tensor([0, 3, 8, V - 1, 3, 1999 - 5])
    assert torch.allclose(decode_rows(tensors, index), full[index], rtol=0, atol=1e-5)
    assert torch.allclose(decode_rows(tensors, slice(5, 40)), full[5:40], rtol=0, atol=1e-5)
    assert decode_rows(tensors, torch.tensor([], dtype=torch.long)).shape == (0, D)


@pytest.mark.parametrize("way", ["lookup_logits", "stage_logits"])
def test_head_logits_score_absent_rows_by_the_fill_row(way, monkeypatch):
    import embzip.codebook as codebook

    *_, tensors = _absent_fit(bits=4)
    monkeypatch.setattr(codebook, "_LOOKUP_LIMIT", 10**9 if way == "lookup_logits" else 0)
    monkeypatch.setattr(codebook, "_STAGE_BLOCK", 20 * D)
    monkeypatch.setattr(models, "native_bf16", lambda: False)  # float32 tables: the exact product
    hidden = torch.randn(2, 3, D)
    expected = hidden @ decode_rows(tensors).T
    got = codebook.head_logits(tensors, hidden)
    assert got.shape == (2, 3, V)
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max().item())


def test_malformed_absent_rows_are_refused():
    from embzip.codebook import check_tensors
    from embzip.errors import FactorsError

    *_, tensors = _absent_fit()
    absent = tensors["absent"]
    for change in ({"absent": absent.flip(0)}, {"absent": absent.long()}, {"absent": absent + V},
                   {"absent.fill": tensors["absent.fill"][:-1]}, {"absent": None}, {"absent.fill": None}):
        bad = {**tensors, **change}
        bad = {k: v for k, v in bad.items() if v is not None}
        with pytest.raises(FactorsError, match="absent"):
            check_tensors(bad)
    with pytest.raises(ValueError, match="increasing"):
        fit_codebook(_matrix(), config=CodebookConfig(bits=2, **FAST), absent=torch.tensor([5, 3]))


def test_decoding_tables_are_derived_once_and_give_the_same_rows(monkeypatch):
    """With a `derived` dict (what a compact module keeps while its tensors stay the same) the decoding tables and
    the transform are built once, for decoding and for the head's stage products alike, and the rows and logits
    are the same to the last bit as without it."""
    import embzip.codebook as codebook

    tensors = fit_codebook(_matrix(), weights=_weights(), config=CodebookConfig(bits=3, focus=0.3, **FAST))
    built = []
    real = codebook._decode_plan
    monkeypatch.setattr(codebook, "_decode_plan", lambda *a: built.append(1) or real(*a))
    index = torch.tensor([3, 7, V - 1, 3])
    hidden = torch.randn(40, D)
    fresh = decode_rows(tensors, index), codebook.stage_logits(tensors, hidden)
    per_call = len(built)
    derived = {}
    for _ in range(3):
        assert torch.equal(decode_rows(tensors, index, derived), fresh[0])
        assert torch.equal(codebook.stage_logits(tensors, hidden, derived), fresh[1])
    stages = sum(name.endswith(".codes") for name in tensors)
    assert per_call == 2 * stages  # without a dict: a table per stage for each decode and each head call
    assert len(built) == per_call + stages  # with one: a table per stage once, shared by decoding and the head
    assert set(derived) == {("transform",), ("plans", torch.device("cpu"))}


def test_a_compact_module_keeps_its_tables_until_its_tensors_change(monkeypatch):
    """A CompressedEmbedding decodes with kept tables; an in-place change to a stored codebook is seen (the
    tables are derived again), and while a stored tensor trains nothing is kept, so gradients reach it."""
    import embzip.codebook as codebook
    from embzip.codebook import Codebook
    from embzip.splice import CompressedEmbedding

    tensors = fit_codebook(_matrix(), config=CodebookConfig(bits=3, **FAST))
    module = CompressedEmbedding(Codebook(tensors))
    ids = torch.tensor([[1, 5, 9]])
    built = []
    real = codebook._decode_plan
    monkeypatch.setattr(codebook, "_decode_plan", lambda *a: built.append(1) or real(*a))
    first = module(ids)
    once = len(built)
    assert torch.equal(module(ids), first) and len(built) == once
    book = module.stored()["stage0.codebook"]
    with torch.no_grad():
        book.copy_(torch.flip(book, [0]))  # other centroids under the same codes
    changed = module(ids)
    assert len(built) == 2 * once and not torch.equal(changed, first)
    assert torch.equal(changed, CompressedEmbedding(Codebook(module.stored()))(ids))
    scale = module.stored()["stage0.codebook.scale"]
    scale.requires_grad_(True)
    for _ in range(2):  # two passes: nothing derived in the first is reused by the second
        module(ids).sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad).all()


@pytest.mark.parametrize("cached", [False, True])
def test_what_a_head_keeps_in_inference_mode_serves_a_later_pass_with_gradients(cached, monkeypatch):
    """A compact codebook head run under torch.inference_mode (a bench, a generation) and then in a pass autograd
    records (fine-tuning the layers around it): the tables it kept, or its decoded matrix with cache_decoded,
    were inference tensors, which autograd refuses to save. Gradients now reach the hidden states, equal to
    those of a head that kept nothing."""
    import embzip.codebook as codebook
    from embzip.codebook import Codebook
    from embzip.splice import CompressedEmbedding, CompressedHead

    monkeypatch.setattr(codebook, "_LOOKUP_LIMIT", 0)  # stage by stage, with the coarse stage's table product
    tensors = fit_codebook(_matrix(), config=CodebookConfig(bits=3, coarse=1, **FAST))
    head = CompressedHead(CompressedEmbedding(Codebook(tensors)), None)
    head.cache_decoded = cached
    with torch.inference_mode():
        head(torch.randn(7, D))
    hidden = torch.randn(7, D, requires_grad=True)
    head(hidden).pow(2).sum().backward()
    fresh = hidden.detach().clone().requires_grad_(True)
    (fresh @ decode_rows(tensors).T).pow(2).sum().backward()
    assert torch.allclose(hidden.grad, fresh.grad, rtol=1e-4, atol=1e-4 * fresh.grad.abs().max().item())


@pytest.mark.parametrize("dtype, bf16_units, fast", [
    (torch.bfloat16, True, True), (torch.bfloat16, False, False), (torch.float16, True, False)])
@pytest.mark.parametrize("way", ["lookup_logits", "stage_logits"])
def test_head_logits_of_16_bit_states_in_their_dtype_where_the_cpu_is_fast_at_it(way, dtype, bf16_units, fast,
                                                                                  monkeypatch):
    """A 16-bit model's dense head multiplies in its dtype, and so does the compact one where the CPU has
    bfloat16 units (about twice as fast there); a CPU without them, or float16 on a CPU (150 times slower
    than float32 on this project's), keeps float32, as does a head gradients may flow through (healing,
    fine-tuning), whose gradients the test above checks."""
    import embzip.codebook as codebook

    monkeypatch.setattr(models, "native_bf16", lambda: bf16_units)
    tensors = fit_codebook(_matrix(), config=CodebookConfig(bits=4, focus=0.3, **FAST))
    hidden = torch.randn(4, D).to(dtype)
    expected = hidden.float() @ decode_rows(tensors).T
    product = dtype if fast else torch.float32
    with torch.inference_mode():
        got = getattr(codebook, way)(tensors, hidden)
    assert got.dtype == product
    rounded = fast or (way == "lookup_logits" and bf16_units)  # float32 states' tables in bfloat16: below
    assert torch.allclose(got.float(), expected, atol=(2e-2 if rounded else 1e-4) * expected.abs().max().item())
    assert getattr(codebook, way)(tensors, hidden).dtype == product  # nothing to train
    assert getattr(codebook, way)(tensors, hidden.clone().requires_grad_()).dtype == torch.float32
    trained = {**tensors, "stage0.codebook": tensors["stage0.codebook"].float().requires_grad_()}
    assert getattr(codebook, way)(trained, hidden).dtype == torch.float32
    with torch.no_grad():  # no backward pass can follow
        assert getattr(codebook, way)(trained, hidden).dtype == product


@pytest.mark.parametrize("bf16_units", [False, True])
def test_a_float32_step_sums_bfloat16_tables_on_a_cpu_with_bfloat16_units(bf16_units, monkeypatch):
    """Few float32 states (a generation step): the per-piece tables are rounded to bfloat16 where the CPU has
    bfloat16 units (faster sums; float32 logits within a bfloat16 rounding of the exact product), float32
    elsewhere, wherever a backward pass may follow and for more states (then the exact product)."""
    import embzip.codebook as codebook

    monkeypatch.setattr(models, "native_bf16", lambda: bf16_units)
    tensors = fit_codebook(_matrix(), config=CodebookConfig(bits=4, focus=0.3, **FAST))
    hidden = torch.randn(3, D)
    expected = hidden @ decode_rows(tensors).T
    tables = []
    original = codebook._lookup
    monkeypatch.setattr(codebook, "_lookup", lambda *a: tables.append(a[3]) or original(*a))
    with torch.inference_mode():
        got = codebook.lookup_logits(tensors, hidden)
    assert got.dtype == torch.float32 and set(tables) == {torch.bfloat16 if bf16_units else torch.float32}
    exact = torch.allclose(got, expected, atol=1e-4 * expected.abs().max().item())
    assert exact != bf16_units  # rounded where the units are, exact where not
    assert torch.allclose(got, expected, atol=2e-2 * expected.abs().max().item())
    tables.clear()
    trained = codebook.lookup_logits(tensors, hidden.clone().requires_grad_())
    assert set(tables) == {torch.float32}
    assert torch.allclose(trained, expected, atol=1e-4 * expected.abs().max().item())
    tables.clear()  # more states than a step (scoring a text): float32 tables, so perplexities are exact
    many = torch.randn(codebook._STEP_STATES + 1, D)
    with torch.inference_mode():
        scored = codebook.lookup_logits(tensors, many)
    assert set(tables) == {torch.float32}
    want = many @ decode_rows(tensors).T
    assert torch.allclose(scored, want, atol=1e-4 * want.abs().max().item())


def test_may_train_says_when_autograd_may_record_a_pass():
    from embzip.compressed import may_train

    plain, trained = torch.ones(2), torch.ones(2, requires_grad=True)
    assert not may_train(plain) and may_train(plain, trained)
    with torch.no_grad():
        assert not may_train(plain, trained)
    with torch.inference_mode():
        assert not may_train(trained)


@pytest.mark.parametrize("scale_of_values", [1e-8, 1e6])
def test_a_codebook_of_values_float16_cannot_hold_keeps_its_tables_in_bfloat16(scale_of_values):
    """The codebook and transform scales and the gains are 16-bit: float16 turned the scales of rows near 1e6 to
    Inf (the fit refused), and clamped those of rows near 1e-8 so that most levels were 0 (error doubled)."""
    from embzip.codebook import Codebook

    torch.manual_seed(0)
    e = torch.randn(2000, 32) @ torch.randn(32, 32) * 0.3
    metric = torch.eye(32) + torch.diag(torch.linspace(0, 8, 32))
    config = CodebookConfig(bits=4, seed=0)
    ordinary = Codebook(fit_codebook(e, metric=metric, config=config))
    scaled = Codebook(fit_codebook(e * scale_of_values, metric=metric, config=config))
    assert ordinary.dtype == torch.float16 and scaled.dtype == torch.bfloat16
    assert {t.dtype for t in scaled.tensors().values() if t.is_floating_point()} == {torch.bfloat16}
    rebuilt = scaled.reconstruct() / scale_of_values
    assert torch.isfinite(rebuilt).all()
    error = (rebuilt - e).norm() / e.norm()
    assert error < 1.2 * (ordinary.reconstruct() - e).norm() / e.norm()  # as good as at ordinary magnitudes
