"""Numerics of factor quantisation on small hand-built tensors (fast, seeded, CPU)."""

import pytest
import torch

from vac.quantize import (dequantize_int8, dequantize_w4, pack_int4, packed_nbytes, quantize_factors,
                          quantize_int8, quantize_w4, refit_down, refit_up, unpack_int4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _per_group(t: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    return t.float().repeat_interleave(group_size, dim=1)[:, :cols]


def test_int8_round_trip_within_half_a_step():
    w = torch.randn(24, 40) * torch.logspace(-3, 1, 24)[:, None]  # rows of very different scale
    d = quantize_int8(w)
    assert d["qweight"].dtype == torch.int8 and d["qweight"].shape == (24, 40)
    assert d["scales"].dtype == torch.float16 and d["scales"].shape == (24,)
    err = (dequantize_int8(d["qweight"], d["scales"]) - w).abs()
    assert (err <= d["scales"].float()[:, None] / 2 * (1 + 1e-6)).all()
    assert d["qweight"].abs().max() == 127  # the row maximum lands on the grid's end


def test_pack_unpack_exact():
    q = torch.randint(-8, 8, (5, 34), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 17)
    assert torch.equal(unpack_int4(packed), q)
    # low nibble is the even column
    assert torch.equal(packed[0, 0] & 0x0F, (q[0, 0].to(torch.int16) & 0x0F).to(torch.uint8))
    raw = torch.randint(0, 256, (3, 9), dtype=torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(raw)), raw)
    with pytest.raises(ValueError, match="odd"):
        pack_int4(q[:, :3])
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((1, 2), 8))


@pytest.mark.parametrize("group_size,cols", [(32, 128), (16, 96), (32, 80)])  # 80: short last group
def test_w4_dequant_within_half_a_step_per_group(group_size, cols):
    w = torch.randn(12, cols) * torch.logspace(-2, 1, cols)[None, :]  # groups of very different scale
    w[3] = w[3].abs()  # an all-positive row: the range must still include 0
    d = quantize_w4(w, group_size)
    n_groups = -(-cols // group_size)
    assert d["qweight"].dtype == torch.uint8 and d["qweight"].shape == (12, cols // 2)
    assert d["scales"].shape == (12, n_groups)
    assert d["zeros"].dtype == torch.uint8 and d["zeros"].shape == (12, (n_groups + 1) // 2)
    deq = dequantize_w4(d["qweight"], d["scales"], d["zeros"], group_size)
    assert deq.shape == w.shape
    bound = _per_group(d["scales"], group_size, cols) / 2 * (1 + 1e-6)
    assert ((deq - w).abs() <= bound).all()
    assert (deq[w == 0] == 0).all()


def test_w4_bytes_under_30_percent_of_bf16():
    w = torch.randn(576, 1536, dtype=torch.bfloat16)
    bf16 = w.numel() * w.element_size()
    for group_size in (32, 64, 128):
        assert packed_nbytes(quantize_w4(w, group_size)) <= 0.30 * bf16
    assert packed_nbytes(quantize_w4(w, 128)) <= 0.27 * bf16
    assert packed_nbytes(quantize_int8(w)) <= 0.51 * bf16


@pytest.mark.parametrize("bad", [0, -32, 1.5, None])
def test_invalid_group_size_raises(bad):
    with pytest.raises(ValueError, match="group_size"):
        quantize_w4(torch.randn(4, 64), bad)


@pytest.mark.parametrize("cols,group_size", [(63, 32), (21, 128), (1, 32)])
def test_w4_odd_columns_pad_and_crop(cols, group_size):
    w = torch.randn(5, cols)
    d = quantize_w4(w, group_size)
    assert d["qweight"].shape == (5, (cols + 1) // 2)
    deq = dequantize_w4(d["qweight"], d["scales"], d["zeros"], group_size, cols=cols)
    assert deq.shape == (5, cols)
    bound = _per_group(d["scales"], group_size, cols) / 2 * (1 + 1e-6)
    assert ((deq - w).abs() <= bound).all()
    # the padding column decodes to exactly zero
    assert (dequantize_w4(d["qweight"], d["scales"], d["zeros"], group_size)[:, cols:] == 0).all()
    out = quantize_factors(torch.randn(8, cols), torch.randn(cols, 40), "w4", group_size)
    assert out["up"].shape == (8, cols) and out["down"].shape == (cols, 40)


def test_bad_method_raises():
    with pytest.raises(ValueError, match="method"):
        quantize_factors(torch.randn(8, 4), torch.randn(4, 8), "int3")
    with pytest.raises(ValueError, match="C"):
        quantize_factors(torch.randn(8, 4), torch.randn(4, 8), "int8", compensate=True)


def test_zero_rows_give_zeros_not_nans():
    w = torch.randn(6, 64)
    w[2] = 0
    w[4, :32] = 0  # a zero group
    deq8 = dequantize_int8(**quantize_int8(w))
    deq4 = dequantize_w4(**quantize_w4(w, 32), group_size=32)
    for deq in (deq8, deq4):
        assert torch.isfinite(deq).all()
        assert (deq[2] == 0).all()
    assert (deq4[4, :32] == 0).all()
    out = quantize_factors(torch.zeros(16, 8), torch.zeros(8, 32), "w4", 16,
                           C=torch.eye(32), compensate=True)
    assert torch.isfinite(out["up"]).all() and torch.isfinite(out["down"]).all()


def _layer(m=48, n=64, r=16, T=512):
    """Low-rank-plus-noise W, its rank-r SVD factors, and correlated inputs X = A Z."""
    W = torch.randn(m, r) @ torch.randn(r, n) / r ** 0.5 + 0.05 * torch.randn(m, n)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    up, down = U[:, :r] * S[:r].sqrt(), S[:r].sqrt()[:, None] * Vh[:r]
    A = torch.randn(n, n) * torch.logspace(0, -1.5, n)[None, :]
    A[:, :3] *= 10  # a few outlier input directions
    X = (A @ torch.randn(n, T)).double()
    return W, up, down, X


def _out_err(W, up, down, X):
    return float(((W.double() - up.double() @ down.double()) @ X).norm())


@pytest.mark.parametrize("method,group_size", [("int8", 128), ("w4", 16), ("w4", 32)])
def test_compensation_reduces_output_error(method, group_size):
    W, up, down, X = _layer()
    C = X @ X.T
    plain = quantize_factors(up, down, method, group_size)
    comp = quantize_factors(up, down, method, group_size, W=W, C=C, compensate=True)
    assert torch.equal(plain["down"], comp["down"])  # down is quantised the same way
    assert _out_err(W, comp["up"], comp["down"], X) < 0.9 * _out_err(W, plain["up"], plain["down"], X)
    # against the unquantised factorization as target, too
    Wr = up @ down
    comp_r = quantize_factors(up, down, method, group_size, C=C, compensate=True)
    assert _out_err(Wr, comp_r["up"], comp_r["down"], X) < 0.9 * _out_err(Wr, plain["up"], plain["down"], X)
    assert set(comp["packed"]) >= {"down.qweight", "down.scales", "up.qweight", "up.scales"}
    assert comp["up"].dtype == up.dtype and comp["up"].shape == up.shape


def test_refit_up_is_the_least_squares_optimum():
    W, up, down, X = _layer(m=12, n=20, r=5, T=200)
    C = X @ X.T
    down_q = dequantize_int8(**quantize_int8(down))
    best = refit_up(W.double(), down_q, C, damp=0)
    base = _out_err(W, best, down_q, X)
    for _ in range(5):  # no perturbation does better
        assert _out_err(W, best + 1e-3 * torch.randn_like(best), down_q, X) > base


def test_refit_down_does_not_depend_on_C():
    W, up, down, X = _layer(m=12, n=20, r=5, T=200)
    up_q = dequantize_int8(**quantize_int8(up)).double()
    d = refit_down(W.double(), up_q)
    assert torch.allclose(d, torch.linalg.lstsq(up_q, W.double()).solution, atol=1e-10)
    # it is optimal for any input covariance: the C-weighted normal equations hold
    for C in (X @ X.T, torch.eye(20, dtype=torch.float64)):
        grad = up_q.T @ (W.double() - up_q @ d) @ C
        assert grad.abs().max() < 1e-8 * C.abs().max()


# --- model level: quantize_model_ on a tiny factorized model ----------------------------------

def _tiny_factorized(ratio=1.5):
    from conftest import random_blocks, tiny_model

    from vac.config import make_config
    from vac.pipeline import compress_

    model = tiny_model()
    calib = random_blocks(8, 32)
    compress_(model, make_config(dict(method="whiten", ratio=ratio, batch_size=4)), calib, progress=False)
    return model, calib


@pytest.mark.parametrize("method", ["int8", "w4"])
def test_quantize_model_weights_are_the_dequantized_packed_tensors(method):
    from vac.quantize import dequantize, factorized_modules, quantize_model_

    model, _ = _tiny_factorized()
    modules = factorized_modules(model)
    before = {n: m.up.weight.clone() for n, m in modules.items()}
    q = quantize_model_(model, method, group_size=32, progress=False)
    assert q["config"]["method"] == method and q["config"]["modules"] == sorted(modules)
    assert q["config"]["group_size"] == (32 if method == "w4" else None)
    for name, mod in modules.items():
        for factor in ("down", "up"):
            w = getattr(mod, factor).weight
            packed = {k.rsplit(".", 1)[-1]: v for k, v in q["tensors"].items() if k.startswith(f"{name}.{factor}.")}
            assert set(packed) == ({"qweight", "scales", "zeros"} if method == "w4" else {"qweight", "scales"})
            assert torch.equal(dequantize(packed, method, 32, w.dtype, cols=w.shape[1]), w)
        assert not torch.equal(before[name], mod.up.weight)  # odd ranks (21, 31) included


def test_quantize_model_compensation_lowers_calibration_error():
    from vac.quantize import quantize_model_

    errs = {}
    for compensate in (False, True):
        model, calib = _tiny_factorized()
        q = quantize_model_(model, "w4", group_size=16, calib_blocks=calib, compensate=compensate, progress=False)
        assert q["stats"]["error_measure"] == "calibration output"
        errs[compensate] = q["stats"]["relative_error_by_kind"]
    for kind, e in errs[True].items():
        assert e < errs[False][kind], (kind, e, errs[False][kind])


def test_quantize_model_refuses_bad_input():
    from vac.errors import VacError
    from vac.quantize import quantize_model_

    from conftest import tiny_model

    with pytest.raises(VacError, match="no factorized"):
        quantize_model_(tiny_model(), "int8", progress=False)
    model, _ = _tiny_factorized()
    with pytest.raises(VacError, match="calib"):
        quantize_model_(model, "w4", compensate=True, progress=False)
    with pytest.raises(VacError, match="method"):
        quantize_model_(model, "int4", progress=False)
