"""Binary codes (dseh/codes.py): sign with sign(0) = +1, packing most significant bit first with
zero padding, Hamming distances kept by packing, and the collapse signs (distinct codes, constant
bits, the label-set cap)."""

import numpy as np
import pytest

from dseh.codes import collapse, constant_bits, count_distinct, pack, packed_width, sign, to_words, unpack

ODD_BITS = [1, 7, 9, 12, 13, 31, 33, 100]  # none a multiple of 8


def _codes(rng, n: int, bits: int) -> np.ndarray:
    return np.where(rng.random((n, bits)) < 0.5, 1, -1).astype(np.int8)


def _popcount_xor(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.unpackbits(np.bitwise_xor(a, b), axis=-1).sum(-1)


def test_sign_never_zero_and_pack_round_trip():
    x = np.array([[0.0, -0.0, 1e-9, -1e-9, 3.0, -2.0, 0.0, 5.0, -1.0, 0.0]])
    s = sign(x)
    assert set(np.unique(s)) <= {-1, 1} and s[0, 0] == 1
    assert np.array_equal(unpack(pack(s), 10), s)
    assert pack(s).shape == (1, 2)


def test_sign_is_int8_and_maps_zero_to_plus_one():
    assert sign(np.array([0.0, -0.0, -1e-300, 2.5])).tolist() == [1, 1, -1, 1]
    assert sign(np.array([0, -3, 5])).dtype == np.int8
    assert sign(0.0) == 1


@pytest.mark.parametrize("bits", [1, 8, 9, 16, 17, 64, 100])
def test_packed_width_is_whole_bytes(bits):
    assert packed_width(bits) == (bits + 7) // 8
    assert pack(np.ones((3, bits))).shape == (3, packed_width(bits))


@pytest.mark.parametrize("bits", ODD_BITS)
def test_pack_unpack_round_trip_with_padding_bits_zero(bits):
    codes = _codes(np.random.default_rng(bits), 40, bits)
    packed = pack(codes)
    assert packed.dtype == np.uint8 and packed.shape == (40, packed_width(bits))
    assert np.array_equal(unpack(packed, bits), codes) and unpack(packed, bits).dtype == np.int8
    assert not np.unpackbits(packed, axis=1)[:, bits:].any()  # the padding is 0 bits in every row


def test_pack_puts_the_first_bit_first_and_plus_one_as_bit_one():
    assert pack(np.array([[1, -1, -1, -1, -1, -1, -1, -1, 1]])).tolist() == [[0x80, 0x80]]
    assert np.array_equal(pack(np.array([[0.5, -0.2, 0.0]])), pack(sign(np.array([[0.5, -0.2, 0.0]]))))


def test_pack_refuses_anything_but_a_matrix():
    with pytest.raises(ValueError, match="2-D"):
        pack(np.ones(8))


@pytest.mark.parametrize("bits", ODD_BITS)
def test_hamming_distance_of_packed_rows_equals_that_of_the_codes(bits):
    codes = _codes(np.random.default_rng(100 + bits), 12, bits)
    expected = (codes[:, None, :] != codes[None, :, :]).sum(-1)
    packed = pack(codes)
    assert np.array_equal(_popcount_xor(packed[:, None, :], packed[None, :, :]), expected)
    words = to_words(packed)
    assert words.dtype == np.uint64 and words.shape == (12, -(-packed_width(bits) // 8))
    as_bytes = words.view(np.uint8)
    assert np.array_equal(_popcount_xor(as_bytes[:, None, :], as_bytes[None, :, :]), expected)


def test_count_distinct_counts_unique_rows():
    codes = _codes(np.random.default_rng(0), 6, 13)
    packed = pack(np.concatenate([codes, codes[:4], codes[:1]]))
    assert count_distinct(packed) == len(np.unique(codes, axis=0)) == 6
    assert count_distinct(np.zeros((0, 2), np.uint8)) == 0


def test_constant_bits_counts_positions_equal_in_every_row_not_the_padding():
    codes = _codes(np.random.default_rng(1), 50, 12)
    assert constant_bits(pack(codes), 12) == 0
    codes[:, 3], codes[:, 10] = 1, -1
    assert constant_bits(pack(codes), 12) == 2
    assert constant_bits(pack(np.ones((5, 12))), 12) == 12  # not 16: the 4 padding bits do not count
    assert constant_bits(np.zeros((0, 2), np.uint8), 12) == 0


def test_collapse_detection():
    assert collapse(pack(np.ones((10, 8))), 8, 2)["collapsed"]
    codes = np.where(np.random.default_rng(0).random((50, 8)) < 0.5, 1, -1)
    assert not collapse(pack(codes), 8, 2)["collapsed"]
    codes[:, 3] = 1
    assert collapse(pack(codes), 8, 2) == {"constant_bits": 1, "distinct_codes": 43, "collapsed": False}
    # one code per class for 10 classes: collapsed against 16 distinct codes, not when capped at 10 label sets
    ten = pack(np.repeat(np.where(np.random.default_rng(1).random((10, 8)) < 0.5, 1, -1), 5, axis=0))
    assert collapse(ten, 8, 16)["collapsed"] and not collapse(ten, 8, 16, label_sets=10)["collapsed"]
    assert collapse(ten[:40], 8, 16, label_sets=10)["collapsed"]  # 8 codes for 10 label sets


def test_every_bit_constant_is_collapse_whatever_the_distinct_floor():
    state = collapse(pack(np.ones((5, 12))), 12, 1, label_sets=1)
    assert state == {"constant_bits": 12, "distinct_codes": 1, "collapsed": True}
    # the label-set cap only lowers the floor: above min_distinct it changes nothing
    many = pack(_codes(np.random.default_rng(2), 30, 12))
    d = count_distinct(many)
    assert (
        collapse(many, 12, d + 1, label_sets=100)["collapsed"]
        and not collapse(many, 12, d, label_sets=100)["collapsed"]
    )
