"""FP8 / FP4 decoders against independent references (ml_dtypes, torch dtypes), all codes, atol=0."""
import ml_dtypes
import numpy as np
import torch

from v4convert.formats import fp4, fp8


def test_e4m3_all_256_bytes_match_ml_dtypes_and_torch():
    b = np.arange(256, dtype=np.uint8)
    ref = b.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    ours = fp8.e4m3_to_float32(torch.from_numpy(b)).numpy()
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_array_equal(ours[~np.isnan(ref)], ref[~np.isnan(ref)])
    t = torch.from_numpy(b).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(ours[~np.isnan(t)], t[~np.isnan(t)])
    # the bit-layout table (independent of torch's cast) agrees too
    tab = fp8.e4m3_table().numpy()
    np.testing.assert_array_equal(np.isnan(tab), np.isnan(ref))
    np.testing.assert_array_equal(tab[~np.isnan(ref)], ref[~np.isnan(ref)])
    # sign of zero preserved
    assert np.signbit(ours[0x80]) and not np.signbit(ours[0])


def test_e8m0_all_256_bytes_match_ml_dtypes_and_torch():
    b = np.arange(256, dtype=np.uint8)
    ref = b.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    ours = fp8.e8m0_to_float32(torch.from_numpy(b)).numpy()
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(ours[ok], ref[ok])
    t = torch.from_numpy(b).view(torch.float8_e8m0fnu).float().numpy()
    np.testing.assert_array_equal(ours[ok], t[ok])
    assert ours[0] == 2.0 ** -127 and ours[127] == 1.0 and ours[254] == 2.0 ** 127


def test_fp4_all_16_codes_and_nibble_order():
    codes = np.arange(16, dtype=np.uint8)
    ref = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32) if hasattr(ml_dtypes, "float4_e2m1fn") else None
    lut = fp4.e2m1_lut().numpy()
    np.testing.assert_array_equal(lut, ref)
    np.testing.assert_array_equal(np.signbit(lut), np.signbit(ref))
    # byte j = code[2j] | code[2j+1] << 4 ; odd row count, odd number of bytes
    rng = np.random.default_rng(0)
    c = rng.integers(0, 16, size=(3, 10), dtype=np.uint8)
    packed = torch.from_numpy((c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8))
    np.testing.assert_array_equal(fp4.unpack_fp4(packed).numpy(), c)
    np.testing.assert_array_equal(fp4.pack_fp4(torch.from_numpy(c)).numpy(), packed.numpy())
    np.testing.assert_array_equal(fp4.decode_fp4(packed.view(torch.int8)).numpy(), lut[c])
