"""Unit tests of the profile's rows: names users recognise, FLOPs from shapes, the gap."""

from __future__ import annotations

import pytest

from hostkit.run.profile import kernel_rows


def test_rows_name_kernels_and_account_for_the_total() -> None:
    raw = {
        "conv2d3": {"calls": 6, "seconds": 0.060,
                    "shapes": [[1, 64, 56, 56], [64, 64, 3, 3], [1, 64, 56, 56]]},
        "fused_conv2d_add_relu1": {"calls": 2, "seconds": 0.010,
                                   "shapes": [[1, 3, 32, 32], [16, 3, 3, 3], [1, 16, 1, 1],
                                              [1, 16, 32, 32]]},
        "matmul": {"calls": 2, "seconds": 0.002, "shapes": [[1, 512], [512, 1000], [1, 1000]]},
        "vm.builtin.alloc_storage": {"calls": 40, "seconds": 0.0002, "shapes": []},
    }
    profile = kernel_rows(raw, runs=2, tuned=False, end_to_end_ms=40.0)
    names = [row.name for row in profile.rows]
    assert names[0] == "conv2d 3x3 64->64 @56x56" and profile.rows[0].calls == 3
    assert "conv2d 3x3 3->16 @32x32 (+ add, relu)" in names
    assert "matmul 1x512 by 512x1000" in names and names[-1].startswith("VM built-ins")
    conv = profile.rows[0]
    assert conv.total_ms == pytest.approx(30.0) and conv.mean_ms == pytest.approx(10.0)
    flops = 2 * 64 * 56 * 56 * 64 * 9
    assert conv.gflops == pytest.approx(flops / 0.010 / 1e9, rel=1e-3)
    assert sum(row.share for row in profile.rows) == pytest.approx(1.0)
    assert profile.kernels_ms == pytest.approx(36.1)
    assert profile.unaccounted == pytest.approx(1 - 36.1 / 40.0)


def test_a_row_is_its_median_call_so_one_slow_call_does_not_move_it() -> None:
    each = [0.001, 0.001, 0.001, 0.009, 0.001, 0.001]  # one call slowed by something else
    raw = {"conv2d3": {"calls": 6, "seconds": sum(each), "each": each,
                       "shapes": [[1, 64, 56, 56], [64, 64, 3, 3], [1, 64, 56, 56]]}}
    (row,) = kernel_rows(raw, runs=3, tuned=False, end_to_end_ms=2.0).rows
    assert row.calls == 2 and row.mean_ms == pytest.approx(1.0)
    assert row.total_ms == pytest.approx(2.0)  # the mean would say 4.67


def test_nhwc_kernels_of_a_tuned_build_are_named_too() -> None:
    raw = {"fused_conv2d_add_relu": {"calls": 1, "seconds": 0.001,
                                     "shapes": [[1, 32, 32, 3], [16, 3, 3, 3], [1, 1, 1, 16],
                                                [1, 32, 32, 16]]},
           "conv2d1": {"calls": 1, "seconds": 0.001,
                       "shapes": [[1, 16, 16, 16], [2, 3, 3, 16, 8], [1, 8, 8, 16]]},
           "conv2d2": {"calls": 1, "seconds": 0.001,
                       "shapes": [[1, 16, 16, 16], [2, 2, 3, 3, 8, 8], [1, 8, 8, 16]]}}
    rows = {row.symbol: row for row in kernel_rows(raw, 1, True, None).rows}
    assert rows["fused_conv2d_add_relu"].name == "conv2d 3x3 3->16 @32x32 (+ add, relu)"
    assert rows["fused_conv2d_add_relu"].gflops == pytest.approx(
        2 * 32 * 32 * 16 * 3 * 9 / 1e-3 / 1e9, abs=0.05)
    # edgekit's direct kernel: weights packed [out/8, kh, kw, in, 8]
    assert rows["conv2d1"].name == "conv2d 3x3 16->16 @8x8"
    assert rows["conv2d1"].gflops == pytest.approx(2 * 8 * 8 * 16 * 16 * 9 / 1e-3 / 1e9, abs=0.05)
    assert rows["conv2d2"].name == "conv2d" and rows["conv2d2"].gflops is None, \
        "a blocked weight layout edgekit did not make is not guessed at"


def test_a_first_layer_reading_the_image_nchw_is_named_too() -> None:
    """The direct kernel of a model's first convolution reads the NCHW image as it came."""
    raw = {"fused_direct_conv_3x3_3x32_224x224_add": {
        "calls": 1, "seconds": 0.0001,
        "shapes": [[1, 3, 224, 224], [1, 3, 3, 3, 32], [32], [1, 112, 112, 32]]}}
    (row,) = kernel_rows(raw, 1, False, None).rows
    assert row.name == "conv2d 3x3 3->32 @112x112 (+ add)"
    assert row.gflops == pytest.approx(2 * 112 * 112 * 32 * 3 * 9 / 1e-4 / 1e9, abs=0.05)


def test_the_matrix_vector_kernel_is_named_as_the_matmul_it_computes() -> None:
    """`hostkit.build.gemv` keeps a linear layer's weights [out, in]: the row says in x out."""
    raw = {"fused_gemv_1280x1000_add24": {"calls": 1, "seconds": 0.0001,
                                          "shapes": [[1, 1280], [1000, 1280], [1000], [1, 1000]]}}
    (row,) = kernel_rows(raw, 1, False, None).rows
    assert row.name == "matmul 1x1280 by 1280x1000 (+ add)"
    assert row.gflops == pytest.approx(2 * 1280 * 1000 / 1e-4 / 1e9)


def test_nhwc_kernels_of_an_untuned_build_are_named_from_hwio_weights() -> None:
    raw = {"fused_conv2d_add_relu": {"calls": 1, "seconds": 0.001,
                                     "shapes": [[1, 32, 32, 3], [3, 3, 3, 16], [1, 1, 1, 16],
                                                [1, 32, 32, 16]]},
           "conv2d1": {"calls": 1, "seconds": 0.001,  # depthwise: one input per output
                       "shapes": [[1, 16, 16, 32], [3, 3, 1, 32], [1, 16, 16, 32]]}}
    rows = {row.symbol: row for row in kernel_rows(raw, 1, False, None).rows}
    assert rows["fused_conv2d_add_relu"].name == "conv2d 3x3 3->16 @32x32 (+ add, relu)"
    assert rows["conv2d1"].name == "conv2d 3x3 32->32 @16x16"
    assert rows["conv2d1"].gflops == pytest.approx(2 * 16 * 16 * 32 * 9 / 1e-3 / 1e9, abs=0.05)


def test_winograd_kernels_are_named_by_their_stage() -> None:
    raw = {"winograd_pack_64_56x56": {"calls": 1, "seconds": 0.0001,
                                      "shapes": [[1, 56, 56, 64], [36, 196, 64]]},
           "winograd_gemm_64x64_196": {"calls": 1, "seconds": 0.0005,
                                       "shapes": [[36, 196, 64], [36, 2, 1, 64, 32],
                                                  [36, 196, 64]]},
           "fused_winograd_unpack_64_56x56_add1_relu1": {
               "calls": 1, "seconds": 0.0001,
               "shapes": [[36, 196, 64], [1, 1, 1, 64], [1, 56, 56, 64]]}}
    rows = {row.symbol: row for row in kernel_rows(raw, 1, False, None).rows}
    assert rows["winograd_pack_64_56x56"].name == "winograd 3x3 input transform 64 channels"
    gemm = rows["winograd_gemm_64x64_196"]
    assert gemm.name == "winograd 3x3 multiply 64->64"
    assert gemm.gflops == pytest.approx(2 * 36 * 196 * 64 * 64 / 0.5e-3 / 1e9, abs=0.05)
    assert rows["fused_winograd_unpack_64_56x56_add1_relu1"].name == \
        "winograd 3x3 output transform 64 channels (+ add, relu)"


def test_a_convolution_after_its_fused_batch_norm_is_named_as_one() -> None:
    """A residual branch's batch norm fused before a downsampling 1x1 convolution leads the
    kernel's name and its arguments (as ResNet-18's are)."""
    raw = {"fused_subtract2_divide2_direct_conv_1x1_64x128_56x56_add4_relu2": {
        "calls": 1, "seconds": 0.001,
        "shapes": [[1, 28, 28, 128], [1, 1, 1, 128], [1, 1, 1, 128], [1, 56, 56, 64],
                   [4, 1, 1, 64, 32], [1, 1, 1, 128], [1, 28, 28, 128]]}}
    row = kernel_rows(raw, 1, False, None).rows[0]
    assert row.name == "conv2d 1x1 64->128 @28x28 (+ subtract, divide, add, relu)"
    assert row.gflops == pytest.approx(2 * 28 * 28 * 128 * 64 / 1e-3 / 1e9, abs=0.05)


def test_depthwise_kernels_are_named_with_their_shape() -> None:
    raw = {"fused_depthwise_conv_3x3_96_112x112_subtract3_maximum2_minimum2": {
        "calls": 1, "seconds": 0.001,
        "shapes": [[1, 112, 112, 96], [3, 3, 96], [1, 1, 1, 96], [1, 56, 56, 96]]}}
    row = kernel_rows(raw, 1, False, None).rows[0]
    assert row.name == "depthwise 3x3 96 channels @56x56 (+ subtract, maximum, minimum)"
    assert row.gflops == pytest.approx(2 * 56 * 56 * 96 * 9 / 1e-3 / 1e9, abs=0.05)


def test_the_fused_expansion_is_named_by_both_convolutions() -> None:
    """`hostkit.build.expansion`: a 1x1 expansion and a depthwise convolution in one kernel."""
    raw = {"fused_expansion_16x96_depthwise_112x112_subtract3_multiply3": {
        "calls": 1, "seconds": 0.0002,
        "shapes": [[1, 112, 112, 16], [16, 96], [96], [3, 3, 96], [96], [96], [1, 56, 56, 96]]}}
    (row,) = kernel_rows(raw, 1, False, None).rows
    assert row.name == ("conv2d 1x1 16->96 @112x112 + depthwise 3x3 96 channels @56x56"
                        " (+ subtract, multiply)")
    flops = 2 * (112 * 112 * 16 * 96 + 56 * 56 * 96 * 9)
    assert row.gflops == pytest.approx(flops / 2e-4 / 1e9, abs=0.05)
