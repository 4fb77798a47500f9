import pytest

from embzip.errors import RankError
from embzip.sizes import check_rank, compression_ratio, max_useful_rank, rank_for_ratio, resolve_rank


def test_bert_base_ranks_match_the_paper():
    # RESEARCH.md: CR 2.5 / 5 / 10 on bert-base-uncased means k = 299 / 149 / 74.
    assert [rank_for_ratio(r, 30522, 768) for r in (2.5, 5, 10)] == [299, 149, 74]


@pytest.mark.parametrize("vocab,hidden,bias,norms", [(30522, 768, False, False), (262144, 640, True, True), (100, 32, True, False)])
def test_max_useful_rank_is_the_last_that_saves(vocab, hidden, bias, norms):
    k = max_useful_rank(vocab, hidden, bias=bias, norms=norms)
    assert compression_ratio(vocab, hidden, k, bias=bias, norms=norms) > 1
    assert compression_ratio(vocab, hidden, k + 1, bias=bias, norms=norms) <= 1


def test_ratio_picks_largest_rank_reaching_it():
    k = rank_for_ratio(4.0, 1000, 100)
    assert compression_ratio(1000, 100, k) >= 4.0 > compression_ratio(1000, 100, k + 1)


@pytest.mark.parametrize("rank,ratio,fragment", [
    (None, None, "exactly one"), (4, 2.0, "exactly one"), (0, None, "positive"), (-3, None, "positive"),
    (10_000, None, "largest useful rank is 749"), (None, 1.0, "greater than 1"), (None, 0.5, "greater than 1"),
    (None, 1e9, "no rank reaches"), (2.5, None, "rank must be a positive integer, got 2.5"),
    (True, None, "positive integer"),
])
def test_bad_rank_or_ratio(rank, ratio, fragment):
    with pytest.raises(RankError, match=fragment):
        resolve_rank(rank, ratio, 30522, 768)


@pytest.mark.parametrize("call", [lambda: compression_ratio(112, 32, 0), lambda: max_useful_rank(0, 0),
                                  lambda: compression_ratio(0, 32, 4), lambda: max_useful_rank(30522, 7.5),
                                  lambda: max_useful_rank(112, 32, stored_bits=0),
                                  lambda: rank_for_ratio(2.0, 112, 32, source_bits=16.5),
                                  lambda: compression_ratio(112, 32, 4, source_bits=-16)])
def test_sizes_of_nothing_are_refused_as_rank_errors_not_division_by_zero(call):
    with pytest.raises(RankError, match="positive integer"):
        call()


def test_numpy_integers_are_sizes_too():
    import numpy as np

    assert compression_ratio(np.int64(1000), np.int32(100), np.int64(10)) == compression_ratio(1000, 100, 10)


@pytest.mark.parametrize("vocab,hidden,bias,norms", [(105, 32, False, False), (30522, 384, True, True),
                                                    (20, 64, False, True), (262144, 640, False, False)])
@pytest.mark.parametrize("source_bits,stored_bits", [(32, 16), (16, 16), (32, 32)])
def test_sizes_count_bytes_and_stop_at_the_matrix_rank(vocab, hidden, bias, norms, source_bits, stored_bits):
    bits = dict(bias=bias, norms=norms, source_bits=source_bits, stored_bits=stored_bits)
    k = max_useful_rank(vocab, hidden, **bits)
    assert compression_ratio(vocab, hidden, k, **bits) > 1 and k <= min(vocab, hidden)
    assert k == min(vocab, hidden) or compression_ratio(vocab, hidden, k + 1, **bits) <= 1
    for ratio in (1.01, 1.5, 3.0):
        r = rank_for_ratio(ratio, vocab, hidden, **bits)
        assert compression_ratio(vocab, hidden, r, **bits) >= ratio and r <= k
        assert r == k or compression_ratio(vocab, hidden, r + 1, **bits) < ratio


def test_a_float32_matrix_in_16_bit_factors_saves_bytes_up_to_its_full_rank():
    # 105 x 32 in float32 is 13,440 bytes; rank 25 in float16 is 6,850: it halves, where counting numbers said "saves
    # nothing" (3,425 numbers against 3,360)
    assert compression_ratio(105, 32, 25, source_bits=32, stored_bits=16) == pytest.approx(13440 / 6850)
    assert max_useful_rank(105, 32, source_bits=32, stored_bits=16) == 32
    assert rank_for_ratio(1.5, 105, 32, source_bits=32, stored_bits=16) == 32
    with pytest.raises(RankError, match="rank 33 is more than a 105 x 32 embedding has"):
        check_rank(33, 105, 32, source_bits=32, stored_bits=16)
    with pytest.raises(RankError, match=r"rank 25 saves nothing .*7,200 bytes, the matrix 7,168\); the largest useful "
                                        "rank is 24"):
        check_rank(25, 112, 32, source_bits=16, stored_bits=16)


@pytest.mark.parametrize("ratio", ["2", None, True])
def test_a_ratio_that_is_not_a_number_is_refused(ratio):
    with pytest.raises(RankError, match="ratio must be a number"):
        rank_for_ratio(ratio, 112, 32)
