"""Numerics of vac.factorize on small hand-built, seeded tensors (float64, milliseconds each)."""

from __future__ import annotations

import pytest
import torch

from vac.factorize import (
    DEFAULT_DAMP,
    Factorization,
    SymEig,
    dense_target_factorize,
    fisher_factorize,
    fisher_scales,
    kfac_factorize,
    output_error,
    psd_power,
    sqrt_and_inverse,
    svd_factorize,
    tail_energy,
    uniform_rank,
    weighted_svd,
    whitened_factorize,
)

D = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=D)


def correlated_inputs(n: int, tokens: int, seed: int = 0, cond: float = 1e3) -> torch.Tensor:
    """X = A Z with A = Q diag(s) of condition number ``cond``: strongly correlated features."""
    Q, _ = torch.linalg.qr(randn(n, n, seed=seed + 1))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=D)
    return (Q * s) @ randn(n, tokens, seed=seed + 2)


def product(f: Factorization) -> torch.Tensor:
    return f.up @ f.down


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> None:
    err = (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()
    assert err < rel, f"relative difference {err:.3e} > {rel:.0e}"


# ---------------------------------------------------------------- shapes, ranks, plain SVD

def test_shapes_and_rank():
    W = randn(12, 8)
    f = svd_factorize(W, 3)
    assert f.up.shape == (12, 3) and f.down.shape == (3, 8) and f.rank == 3
    assert f.spectrum.shape == (8,)
    assert torch.all(f.spectrum[:-1] >= f.spectrum[1:])


@pytest.mark.parametrize("rank", [0, -1, 9, 2.0])
def test_rank_out_of_range_raises(rank):
    W = randn(12, 8)
    C = W.T @ W
    for call in (lambda: svd_factorize(W, rank), lambda: whitened_factorize(W, C, rank),
                 lambda: kfac_factorize(W, C, None, rank), lambda: fisher_factorize(W, W * W, rank),
                 lambda: dense_target_factorize(W, C, C, rank)):
        with pytest.raises(ValueError):
            call()


def test_svd_of_rank_r_matrix_is_exact():
    W = randn(10, 3, seed=1) @ randn(3, 7, seed=2)
    f = svd_factorize(W, 3)
    assert_close_rel(product(f), W, 1e-12)
    assert f.spectrum[3:].abs().max() < 1e-5


def test_factors_share_singular_values_evenly():
    f = svd_factorize(randn(9, 6), 4)
    # sqrt(S) on each side: column norms of up equal row norms of down
    torch.testing.assert_close(f.up.norm(dim=0), f.down.norm(dim=1))


def test_dtype_preserved():
    W = randn(8, 6).float()
    f = whitened_factorize(W, (W.T @ W), 2)
    assert f.up.dtype == f.down.dtype == torch.float32


# ---------------------------------------------------------------- whitening

def test_whitening_beats_svd_on_correlated_inputs():
    W, X = randn(16, 12), correlated_inputs(12, 200)
    C, r = X @ X.T, 4
    e_svd = output_error(W, *_ud(svd_factorize(W, r)), X)
    e_white = output_error(W, *_ud(whitened_factorize(W, C, r, damp=1e-8)), X)
    assert e_white * 10 < e_svd, (e_white, e_svd)


def test_whitening_tail_equals_output_error():
    W = randn(10, 8)
    X = randn(8, 100, seed=3) + 0.3 * randn(8, 1, seed=4)  # well conditioned, not centred
    C = X @ X.T
    for r in (1, 3, 6):
        f = whitened_factorize(W, C, r, damp=0.0)
        predicted = tail_energy(f.spectrum)[r].item()
        actual = output_error(W, f.up, f.down, X)
        assert abs(predicted - actual) / actual < 1e-6, (r, predicted, actual)


def _ud(f: Factorization) -> tuple[torch.Tensor, torch.Tensor]:
    return f.up, f.down


# ---------------------------------------------------------------- K-FAC

def test_kfac_without_G_is_whitening():
    W, X = randn(10, 8), correlated_inputs(8, 60, cond=1e2)
    C = X @ X.T
    white = product(whitened_factorize(W, C, 3))
    for G in (None, torch.eye(10, dtype=D)):
        f = kfac_factorize(W, C, G, 3, out_exponent=0.0, in_exponent=0.5)
        assert_close_rel(product(f), white)
        torch.testing.assert_close(f.spectrum, whitened_factorize(W, C, 3).spectrum)
    # G = identity with a nonzero exponent is a (damped) multiple of the identity: still whitening
    assert_close_rel(product(kfac_factorize(W, C, torch.eye(10, dtype=D), 3, out_exponent=0.25)), white)


def test_kfac_diagonal_is_separable_scaling():
    W = randn(10, 8)
    c = torch.rand(8, generator=gen(5), dtype=D) + 0.1
    g = torch.rand(10, generator=gen(6), dtype=D) + 0.1
    a, b = 0.25, 0.5
    ref = product(weighted_svd(W, 3, left=g ** a, right=c ** b))
    for C, G in ((c, g), (torch.diag(c), torch.diag(g))):
        f = kfac_factorize(W, C, G, 3, out_exponent=a, in_exponent=b, damp=0.0)
        assert_close_rel(product(f), ref)
    # 1-D and 2-D diagonals are damped identically
    assert_close_rel(product(kfac_factorize(W, c, g, 3)),
                     product(kfac_factorize(W, torch.diag(c), torch.diag(g), 3)))


def test_kfac_output_weight_helps_weighted_error():
    # with a = b = 1/2 and no damping, K-FAC minimises ||G^1/2 dW C^1/2||: it must beat whitening there
    W, X = randn(10, 8), correlated_inputs(8, 60, cond=1e2)
    Gm = correlated_inputs(10, 60, seed=7, cond=1e2)
    C, G = X @ X.T, Gm @ Gm.T

    def weighted_err(f):
        return torch.linalg.norm(psd_power(G, 0.5) @ (W - product(f)) @ psd_power(C, 0.5)).item()

    kf = kfac_factorize(W, C, G, 3, out_exponent=0.5, in_exponent=0.5, damp=0.0)
    assert weighted_err(kf) < weighted_err(whitened_factorize(W, C, 3, damp=0.0))


def test_decomposed_G_gives_the_same_factors_and_checks_damping():
    W, X = randn(10, 8), correlated_inputs(8, 60, cond=1e2)
    Gm = correlated_inputs(10, 60, seed=7, cond=1e2)
    C, G = X @ X.T, Gm @ Gm.T
    plain = kfac_factorize(W, C, G, 3, out_exponent=0.25, damp=0.05)
    eig = kfac_factorize(W, C, SymEig(G, 0.05), 3, out_exponent=0.25, damp=0.05)
    torch.testing.assert_close(product(eig), product(plain))
    torch.testing.assert_close(SymEig(G, 0.0).power(0.5), psd_power(G, 0.5))
    with pytest.raises(ValueError, match="damp"):
        kfac_factorize(W, C, SymEig(G, 0.05), 3, damp=0.01)


def test_kfac_shape_mismatch_raises():
    W = randn(10, 8)
    with pytest.raises(ValueError):
        kfac_factorize(W, torch.eye(10, dtype=D), None, 2)
    with pytest.raises(ValueError):
        kfac_factorize(W, torch.eye(8, dtype=D), torch.eye(8, dtype=D), 2)


# ---------------------------------------------------------------- diagonal Fisher

def test_fisher_uniform_equals_svd():
    W = randn(10, 8)
    f = fisher_factorize(W, torch.full((10, 8), 3.7, dtype=D), 3)
    assert_close_rel(product(f), product(svd_factorize(W, 3)))


def test_fisher_zero_falls_back_to_svd():
    W = randn(10, 8)
    f = fisher_factorize(W, torch.zeros(10, 8, dtype=D), 3)
    assert_close_rel(product(f), product(svd_factorize(W, 3)))


def test_fisher_scales_normalised_and_clamped():
    F = torch.ones(50, 5, dtype=D)
    F[0] = 1e6  # one outlier row: its scale ~48x the mean
    F[:, 1] = 0.0  # one dead column
    a, b = fisher_scales(F, exponent=0.5)
    assert a[0] == 20.0  # upper clamp
    assert torch.all(a[1:] == 0.05)  # the outlier inflates the mean, the rest hit the lower clamp
    assert b[1] == 0.05  # dead column clamped up, stays invertible
    assert torch.all(b[[0, 2, 3, 4]] == 1.25)  # 1 / mean over (1, 0, 1, 1, 1)
    # without clamping hit, scales are mean 1
    a, b = fisher_scales(torch.rand(6, 5, generator=gen(8), dtype=D) + 0.5)
    torch.testing.assert_close(a.mean().item(), 1.0)
    torch.testing.assert_close(b.mean().item(), 1.0)


def test_fisher_matches_weighted_svd_and_is_finite_with_dead_channels():
    W = randn(10, 8)
    F = torch.rand(10, 8, generator=gen(9), dtype=D) ** 4
    F[3] = 0.0
    f = fisher_factorize(W, F, 4, exponent=0.5)
    a, b = fisher_scales(F, exponent=0.5)
    assert_close_rel(product(f), product(weighted_svd(W, 4, left=a, right=b)))
    assert torch.isfinite(f.up).all() and torch.isfinite(f.down).all()


# ---------------------------------------------------------------- dense-target closed loop

def _noisy_pair(n=12, tokens=300, noise=0.3, seed=10):
    X = correlated_inputs(n, tokens, seed=seed, cond=30.0)
    # the compressed model's inputs: a systematic distortion plus noise
    E = noise * (randn(n, n, seed=seed + 5) / n ** 0.5) @ X + 0.1 * noise * randn(n, tokens, seed=seed + 6)
    return X, X + E


def test_dense_target_reduces_to_whitening_when_inputs_equal():
    W, X = randn(10, 12), correlated_inputs(12, 100, cond=1e2)
    C = X @ X.T
    for damp in (0.0, DEFAULT_DAMP):
        f = dense_target_factorize(W, C, C, 4, damp=damp)
        w = whitened_factorize(W, C, 4, damp=damp)
        assert_close_rel(product(f), product(w))
        torch.testing.assert_close(f.spectrum, w.spectrum, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damp", [0.0, DEFAULT_DAMP])
def test_dense_target_beats_open_and_closed_loop_whitening(damp):
    W = randn(10, 12, seed=11)
    X, Xt = _noisy_pair()
    C, Ct, Cx = X @ X.T, Xt @ Xt.T, X @ Xt.T
    r = 4
    err = {
        "dense_target": output_error(W, *_ud(dense_target_factorize(W, Ct, Cx, r, damp=damp)), X, Xt),
        "fit_compressed": output_error(W, *_ud(whitened_factorize(W, Ct, r, damp=damp)), X, Xt),
        "one_shot": output_error(W, *_ud(whitened_factorize(W, C, r, damp=damp)), X, Xt),
    }
    assert err["dense_target"] < 0.95 * min(err["fit_compressed"], err["one_shot"]), err


def test_dense_target_tail_is_excess_over_least_squares_floor():
    W = randn(10, 12, seed=11)
    X, Xt = _noisy_pair()
    Ct, Cx = Xt @ Xt.T, X @ Xt.T
    W_star = torch.linalg.lstsq(Xt.T, (W @ X).T).solution.T
    floor = torch.linalg.norm(W @ X - W_star @ Xt).item() ** 2
    for r in (2, 5):
        f = dense_target_factorize(W, Ct, Cx, r, damp=0.0)
        total = output_error(W, f.up, f.down, X, Xt)
        assert abs(floor + tail_energy(f.spectrum)[r].item() - total) / total < 1e-6


def test_dense_target_with_output_weight_runs():
    W = randn(10, 12, seed=11)
    X, Xt = _noisy_pair()
    g = torch.rand(10, generator=gen(12), dtype=D) + 0.1
    f = dense_target_factorize(W, Xt @ Xt.T, X @ Xt.T, 3, G=g, out_exponent=0.25)
    assert f.up.shape == (10, 3) and torch.isfinite(product(f)).all()


# ---------------------------------------------------------------- helpers

@pytest.mark.parametrize("m,n", [(64, 64), (176, 64), (4096, 11008), (7, 3)])
@pytest.mark.parametrize("ratio", [1.0, 1.5, 1.8, 2.0, 3.0])
def test_uniform_rank_meets_ratio(m, n, ratio):
    r = uniform_rank(m, n, ratio)
    if r >= 1:
        assert m * n / (r * (m + n)) >= ratio
        assert m * n / ((r + 1) * (m + n)) < ratio  # and is the largest such rank


def test_psd_power_square_root():
    A = randn(7, 7)
    C = A @ A.T + 0.1 * torch.eye(7, dtype=D)
    R = psd_power(C, 0.5)
    torch.testing.assert_close(R @ R, C)
    torch.testing.assert_close(psd_power(C, -0.5) @ R, torch.eye(7, dtype=D))


def test_sqrt_and_inverse_cholesky_and_fallback():
    A = randn(6, 6)
    C = A @ A.T + torch.eye(6, dtype=D)
    L, L_inv = sqrt_and_inverse(C)
    torch.testing.assert_close(L @ L.T, C)
    torch.testing.assert_close(L @ L_inv, torch.eye(6, dtype=D))
    assert torch.equal(L, torch.tril(L))  # Cholesky path
    # singular C (an exactly dead feature): Cholesky fails, the eigen root takes over
    A[2] = 0.0
    C = A @ A.T
    L, L_inv = sqrt_and_inverse(C)
    assert torch.isfinite(L).all() and torch.isfinite(L_inv).all()
    torch.testing.assert_close(L, L.T)  # symmetric eigen root, not triangular
    torch.testing.assert_close(L @ L.T, C)


def test_tail_energy():
    t = tail_energy(torch.tensor([3.0, 2.0, 1.0]))
    torch.testing.assert_close(t, torch.tensor([14.0, 5.0, 1.0, 0.0], dtype=D))
