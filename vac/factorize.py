"""Pure tensor maths of low-rank factorization: weighted SVDs and rank formulas.

No hooks, no models: every function takes matrices and returns matrices, so each method is
tested on hand-built tensors in milliseconds.

Convention: W is m x n (out x in), y = W x. A factorization returns ``up`` (m x r) and
``down`` (r x n) with W ~= up @ down, the singular values split evenly between the two
(sqrt(S) on each side) so that both factors have similar scales, which helps both
fine-tuning and quantization.

Every loss-aware method is an instance of one weighted SVD: choose a left weight Lo (m x m)
and a right weight Li (n x n), take the truncated SVD of A = Lo W Li, and unweight:
W' = Lo^-1 [A]_r Li^-1. The discarded squared singular values of A are the weighted error
||Lo (W - W') Li||_F^2, so one decomposition gives the predicted loss of every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: default relative damping added to covariance diagonals: C + damp * mean(diag C) * I.
#: Calibration covariances of LLM activations are rank-deficient (few tokens, outlier
#: dimensions); without damping their inverse square roots blow up on null directions.
DEFAULT_DAMP = 1e-2


@dataclass
class Factorization:
    up: torch.Tensor  # m x r
    down: torch.Tensor  # r x n
    #: all singular values of the weighted matrix, descending (for rank/loss curves)
    spectrum: torch.Tensor

    @property
    def rank(self) -> int:
        return self.up.shape[1]


def compute_dtype(device: torch.device) -> torch.dtype:
    """float64 on CPU (cheap, and the inverse square roots need it); float32 on accelerators."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def check_rank(rank: int, m: int, n: int) -> None:
    if not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be an integer in [1, {min(m, n)}] for a {m}x{n} matrix, got {rank!r}")


def uniform_rank(m: int, n: int, ratio: float) -> int:
    """Largest rank whose factorization is at least ``ratio`` times smaller than m*n."""
    return int((m * n) // (ratio * (m + n)))


def tail_energy(spectrum: torch.Tensor) -> torch.Tensor:
    """tail[r] = sum_{k >= r} sigma_k^2 for r = 0..len: the weighted error of keeping rank r."""
    s2 = spectrum.double() ** 2
    tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)])


def damped(C: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """C + damp * mean(diag C) * I (symmetrised)."""
    C = 0.5 * (C + C.T)
    scale = torch.diagonal(C).mean().clamp_min(torch.finfo(C.dtype).tiny)
    return C + damp * scale * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)


def psd_power(C: torch.Tensor, power: float, eps: float = 1e-12) -> torch.Tensor:
    """C^power for a symmetric positive semi-definite C, by eigendecomposition.

    Eigenvalues below eps * max are clamped so negative powers stay finite.
    """
    evals, evecs = torch.linalg.eigh(0.5 * (C + C.T))
    evals = evals.clamp_min(evals.max().clamp_min(0) * eps + torch.finfo(C.dtype).tiny)
    return (evecs * evals.pow(power)) @ evecs.T


def psd_powers(C: torch.Tensor, *powers: float, eps: float = 1e-12) -> list[torch.Tensor]:
    """Several powers of one symmetric PSD matrix from a single eigendecomposition."""
    evals, evecs = torch.linalg.eigh(0.5 * (C + C.T))
    evals = evals.clamp_min(evals.max().clamp_min(0) * eps + torch.finfo(C.dtype).tiny)
    return [(evecs * evals.pow(p)) @ evecs.T for p in powers]


class SymEig:
    """The eigendecomposition of a symmetric PSD matrix M, kept to take several powers of its
    damped form M + damp * mean(diag M) * I.

    The pipeline decomposes each output-gradient covariance G once (while profiling, one layer
    at a time), stores it undamped, and hands it to both the allocator (G^1/2) and the
    factorization (G^a, G^-a). Damping shifts every eigenvalue by the same amount, so one stored
    decomposition serves any ``damp``.

    Two forms of one formula, M = U diag(evals) U^T + tail (I - U U^T):

    * full: U is m x m and the tail term vanishes;
    * thin: U is m x k. G = sum_t g_t g_t^T over T < m gradient tokens has rank <= T, so it is
      exactly its T nonzero eigenpairs with tail 0: ``from_rows`` gets them from the T x T Gram
      matrix, O(T^2 m) instead of the O(m^3) of a full eigendecomposition, and stores m x T.
      ``rank`` truncates a full decomposition the same way, with the mean of the dropped
      eigenvalues as the tail (the trace is kept), to bound the statistics store on very wide
      matrices.
    """

    def __init__(self, M: torch.Tensor | None = None, damp: float | None = DEFAULT_DAMP, eps: float = 1e-12,
                 rank: int | None = None):
        # damp None: the raw decomposition (what the store keeps); a number: damped and floored
        self.damp, self.eps = None, eps
        self.tail: float | None = None
        if M is None:  # filled in by a constructor classmethod
            return
        dtype = compute_dtype(M.device)
        M = M.to(dtype)
        evals, evecs = torch.linalg.eigh(0.5 * (M + M.T))
        self.mean_diag = float(torch.diagonal(M).mean())
        self.evals, self.evecs = evals.clamp_min(0), evecs
        if rank is not None:
            self.truncate_(rank)
        if damp is not None:
            self._damp_(damp)

    def truncate_(self, rank: int) -> "SymEig":
        """Keep the top ``rank`` eigenpairs; the rest become the tail, at their mean (trace kept)."""
        m, k = self.evecs.shape
        if rank >= k:
            return self
        order = torch.argsort(self.evals, descending=True)
        dropped = self.evals[order[rank:]].sum() + (self.tail or 0.0) * (m - k)
        self.evals, self.evecs = self.evals[order[:rank]].clone(), self.evecs[:, order[:rank]].clone()
        self.tail = float(dropped / (m - rank))
        return self

    @classmethod
    def from_rows(cls, rows: torch.Tensor, damp: float | None = None, eps: float = 1e-12) -> "SymEig":
        """The decomposition of M = rows^T rows (rows: T x m, T < m) in thin form."""
        self = cls(eps=eps)
        R = rows.to(compute_dtype(rows.device))
        lam, V = torch.linalg.eigh(R @ R.T)  # the nonzero spectrum of M, from the T x T Gram
        keep = lam > lam.max().clamp_min(0) * 1e-12
        lam, V = lam[keep], V[:, keep]
        self.evecs = (R.T @ V) / lam.sqrt()[None, :]  # unit eigenvectors of M for those eigenvalues
        self.evals, self.tail = lam, 0.0
        self.mean_diag = float(R.square().sum() / R.shape[1])
        if damp is not None:
            self._damp_(damp)
        return self

    def damped(self, damp: float) -> "SymEig":
        """M + damp * mean(diag M) * I, decomposed (eigenvalues shifted, then floored)."""
        if self.damp is not None:
            raise ValueError("damped() takes a raw (undamped) decomposition")
        out = SymEig(eps=self.eps)
        out.evecs, out.evals, out.tail, out.mean_diag = self.evecs, self.evals, self.tail, self.mean_diag
        out._damp_(damp)
        return out

    def _damp_(self, damp: float) -> None:
        dtype = self.evals.dtype
        tiny = torch.finfo(dtype).tiny
        lam = damp * max(self.mean_diag, tiny)
        evals = self.evals + lam
        # the same floor as psd_power, so that negative powers stay finite without damping
        top = max(float(evals.max()) if evals.numel() else 0.0, (self.tail or 0.0) + lam, 0.0)
        floor = top * self.eps + tiny
        self.evals = evals.clamp_min(floor)
        if self.tail is not None:
            self.tail = max(self.tail + lam, floor)
        self.damp = damp

    @property
    def shape(self) -> torch.Size:
        m = self.evecs.shape[0]
        return torch.Size((m, m))

    @property
    def thin(self) -> bool:
        return self.tail is not None

    def power(self, p: float) -> torch.Tensor:
        if not self.thin:
            return (self.evecs * self.evals.pow(p)) @ self.evecs.T
        t = self.tail ** p  # U diag(e^p) U^T + t^p (I - U U^T) = U diag(e^p - t^p) U^T + t^p I
        out = (self.evecs * (self.evals.pow(p) - t)) @ self.evecs.T
        out.diagonal().add_(t)
        return out

    def to(self, device=None, dtype=None) -> "SymEig":
        out = SymEig(eps=self.eps)
        out.evals, out.evecs = self.evals.to(device, dtype), self.evecs.to(device, dtype)
        out.tail, out.mean_diag, out.damp = self.tail, self.mean_diag, self.damp
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """For the statistics store (``from_tensors`` reads them back)."""
        if self.damp is not None:
            raise ValueError("store the raw (undamped) decomposition")
        out = {"evecs": self.evecs.contiguous(), "evals": self.evals.contiguous(),
               "mean_diag": torch.tensor([self.mean_diag], dtype=torch.float64)}
        if self.thin:
            out["tail"] = torch.tensor([self.tail], dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "SymEig":
        self = cls()
        self.evecs, self.evals = tensors["evecs"], tensors["evals"]
        self.mean_diag = float(tensors["mean_diag"][0])
        self.tail = float(tensors["tail"][0]) if "tail" in tensors else None
        return self


def sqrt_and_inverse(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A square root L of C (C = L L^T) and its inverse: Cholesky, or eigen-root when C is not PD."""
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) == 0:
        eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
        L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
        if torch.isfinite(L_inv).all():
            return L, L_inv
    return tuple(psd_powers(C, 0.5, -0.5))


def cholesky_root(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(L, None) with C = L L^T, L lower triangular (undone by triangular solves, no inverse formed);
    or (C^1/2, C^-1/2) by eigendecomposition when C is not positive definite."""
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) == 0:
        return L, None
    root, inv = psd_powers(C, 0.5, -0.5)
    return root, inv


def _whiten_right(W: torch.Tensor, rank: int, C: torch.Tensor, L: torch.Tensor | None = None,
                  **left) -> Factorization:
    """weighted_svd of W with the right weight a square root of the damped, PD ``C``: Cholesky
    (``L`` when the caller has it), unless it is singular in practice (non-finite factors), then
    the eigen-root."""
    L, L_inv = (L, None) if L is not None else cholesky_root(C)
    f = weighted_svd(W, rank, right=L, right_inv=L_inv, right_lower=L_inv is None, **left)
    if L_inv is None and not (torch.isfinite(f.down).all() and torch.isfinite(f.up).all()):
        root, inv = psd_powers(C, 0.5, -0.5)
        f = weighted_svd(W, rank, right=root, right_inv=inv, **left)
    return f


def weighted_svd(W: torch.Tensor, rank: int, *,
                 left: torch.Tensor | None = None, left_inv: torch.Tensor | None = None,
                 right: torch.Tensor | None = None, right_inv: torch.Tensor | None = None,
                 right_lower: bool = False) -> Factorization:
    """Truncated SVD of Lo W Li, unweighted back: up = Lo^-1 U_r S_r^1/2, down = S_r^1/2 V_r^T Li^-1.

    ``left``/``right`` may be 1-D (diagonal weights) or 2-D matrices; omitted means identity.
    ``right_lower``: ``right`` is lower triangular and, without ``right_inv``, is undone by a
    triangular solve (for n = 27,648 an explicit inverse would be 3 GB more in float32).
    """
    m, n = W.shape
    check_rank(rank, m, n)
    dtype = compute_dtype(W.device)
    A = W.to(dtype)
    if left is not None:
        A = left.to(dtype)[:, None] * A if left.dim() == 1 else left.to(dtype) @ A
    if right is not None:
        A = A * right.to(dtype)[None, :] if right.dim() == 1 else A @ right.to(dtype)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    root = S[:rank].sqrt()
    up = U[:, :rank] * root[None, :]
    down = root[:, None] * Vh[:rank]
    if left is not None:
        inv = left_inv if left_inv is not None else (1.0 / left if left.dim() == 1 else torch.linalg.inv(left.to(dtype)))
        up = inv.to(dtype)[:, None] * up if inv.dim() == 1 else inv.to(dtype) @ up
    if right is not None and right_inv is None and right_lower:
        down = torch.linalg.solve_triangular(right.to(dtype), down, upper=False, left=False)  # down Li^-1
    elif right is not None:
        inv = right_inv if right_inv is not None else (1.0 / right if right.dim() == 1 else torch.linalg.inv(right.to(dtype)))
        down = down * inv.to(dtype)[None, :] if inv.dim() == 1 else down @ inv.to(dtype)
    return Factorization(up=up.to(W.dtype), down=down.to(W.dtype), spectrum=S.to(torch.float32))


def svd_factorize(W: torch.Tensor, rank: int) -> Factorization:
    """Plain truncated SVD: best rank-r approximation in Frobenius norm (F ~= I)."""
    return weighted_svd(W, rank)


def whitened_factorize(W: torch.Tensor, C: torch.Tensor, rank: int, damp: float = DEFAULT_DAMP) -> Factorization:
    """Activation-whitened SVD (SVD-LLM's truncation-aware whitening).

    C = sum x x^T over calibration tokens (n x n). With C = L L^T, the SVD of W L discards
    singular values whose squares sum to exactly the output error ||(W - W') X||_F^2
    (up to damping), so truncation is optimal for the outputs the layer really produces.
    """
    return _whiten_right(W, rank, damped(C.to(compute_dtype(W.device)), damp))


def _side_weight(M: torch.Tensor | None, exponent: float, damp: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(M^e, M^-e) of a damped second-moment matrix, or (None, None) for the identity.

    A 1-D ``M`` is a diagonal (a separable per-channel scaling), damped the same way as a
    full matrix so that ``M`` and ``torch.diag(M)`` give the same weights.
    """
    if M is None or exponent == 0:
        return None, None
    if isinstance(M, SymEig):
        if M.damp != damp:
            raise ValueError(f"G was decomposed with damp={M.damp}, asked for damp={damp}")
        return M.power(exponent).to(dtype), M.power(-exponent).to(dtype)
    M = M.to(dtype)
    if M.dim() == 1:
        d = M.clamp_min(0)
        d = d + damp * d.mean().clamp_min(torch.finfo(dtype).tiny)
        # same floor as psd_power, so that a zero channel stays invertible without damping
        d = d.clamp_min(d.max() * 1e-12 + torch.finfo(dtype).tiny)
        return d.pow(exponent), d.pow(-exponent)
    return tuple(psd_powers(damped(M, damp), exponent, -exponent))


def fisher_scales(F: torch.Tensor, exponent: float = 1 / 3,
                  clamp: tuple[float, float] = (0.05, 20.0)) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Row and column scales (a, b) of the separable diagonal-Fisher approximation F_ij ~ a_i b_j.

    Returns None when F carries no information (all zero or not finite).
    """
    F = F.to(compute_dtype(F.device)).clamp_min(0)  # squared gradients: negatives are noise
    if not torch.isfinite(F).all() or F.sum() <= 0:
        return None
    scales = []
    for s in (F.mean(dim=1), F.mean(dim=0)):
        s = s.pow(exponent)
        # Normalising to mean 1 makes the exponent, not the Fisher's overall magnitude (which
        # depends on the loss scale and token count), decide the strength; the clamp keeps one
        # dead or outlier channel from dominating the SVD or making the unscale blow up.
        s = (s / s.mean()).clamp(*clamp)
        scales.append(s)
    return scales[0], scales[1]


def fisher_factorize(W: torch.Tensor, F: torch.Tensor, rank: int, exponent: float = 1 / 3,
                     clamp: tuple[float, float] = (0.05, 20.0)) -> Factorization:
    """The seed's separable diagonal-Fisher weighted SVD.

    F (m x n) is the diagonal empirical Fisher of W, mean over sequences of (dL/dW_ij)^2.
    Approximating F_ij ~ a_i b_j with a = row means, b = column means makes the quadratic loss
    sum_ij F_ij dW_ij^2 a weighted Frobenius norm that one SVD minimises: SVD of
    diag(a^e) W diag(b^e), then unscale. e = 1/2 is the exact square root of the separable
    approximation; the seed found the gentler e = 1/3 better, because the separable fit and
    the empirical Fisher are both noisy and a full-strength weighting over-trusts them.
    An all-zero Fisher (no gradient reached this layer) falls back to plain SVD.
    """
    check_rank(rank, *W.shape)
    scales = fisher_scales(F, exponent, clamp)
    if scales is None:
        return svd_factorize(W, rank)
    a, b = scales
    return weighted_svd(W, rank, left=a, left_inv=1.0 / a, right=b, right_inv=1.0 / b)


def kfac_factorize(W: torch.Tensor, C: torch.Tensor, G: torch.Tensor | None, rank: int,
                   out_exponent: float = 0.25, in_exponent: float = 0.5,
                   damp: float = DEFAULT_DAMP) -> Factorization:
    """Two-sided K-FAC weighted SVD: SVD of G^a W C^b, unscaled with G^-a and C^-b.

    C = sum x x^T over input tokens (n x n), G = sum g g^T over output gradients (m x m);
    F ~= G (x) C makes vec(dW)^T F vec(dW) = ||G^1/2 dW C^1/2||_F^2, so a = b = 1/2 is the
    K-FAC-exact weighting. The seed found a gentler output exponent (a = 1/4) better: G from
    a small calibration set is noisy, and whitening (a = 0) ignores it entirely.

    Special cases: ``G=None`` or a = 0 leaves the output side unweighted; with a = 0, b = 1/2
    this is whitening (``whitened_factorize``) up to the choice of square root: here the
    symmetric root C^1/2, there the Cholesky factor L = C^1/2 Q with Q orthogonal, so the
    factors differ by Q but the product up @ down and the spectrum are the same.
    1-D ``C``/``G`` are diagonals; with both diagonal this is a separable diagonal scaling,
    the same family as ``fisher_factorize``. Powers are by eigendecomposition of the damped
    matrices (both sides damped with the same relative ``damp``).
    """
    m, n = W.shape
    check_rank(rank, m, n)
    dtype = compute_dtype(W.device)
    if G is not None and G.shape[0] != m:
        raise ValueError(f"G has size {G.shape[0]} but W has {m} output features")
    if C.shape[0] != n:
        raise ValueError(f"C has size {C.shape[0]} but W has {n} input features")
    left, left_inv = _side_weight(G, out_exponent, damp, dtype)
    right, right_inv = _side_weight(C, in_exponent, damp, dtype)
    return weighted_svd(W, rank, left=left, left_inv=left_inv, right=right, right_inv=right_inv)


def dense_target_factorize(W: torch.Tensor, C_tilde: torch.Tensor, C_cross: torch.Tensor, rank: int,
                           G: torch.Tensor | None = None, out_exponent: float = 0.0,
                           damp: float = DEFAULT_DAMP) -> Factorization:
    """Closed-loop fit of the *dense* outputs from the compressed inputs: min ||W X - W' X~||_F.

    X (n x T) are the dense model's inputs to this layer, X~ the partly compressed model's
    inputs on the same tokens; ``C_tilde`` = X~ X~^T, ``C_cross`` = X X~^T (both n x n).
    The unconstrained least-squares solution is W* = W C_cross C_tilde^-1, and since the
    residual W X - W* X~ is orthogonal to the row space of X~,
        ||W X - W' X~||^2 = ||W X - W* X~||^2 + ||(W* - W') X~||^2,
    so with C_tilde = L L^T the best rank-r W' is [W* L]_r L^-1: whitening applied to W*.
    This lets the layer undo the error its compressed predecessors introduced, rather than
    reproduce it (fitting W X~ alone, ``whitened_factorize(W, C_tilde)``, does the latter).

    Damping adds lambda = damp * mean(diag C_tilde) to the diagonal of *both* C_tilde and
    C_cross: the same as appending sqrt(lambda) * I as extra tokens to X and X~ alike. The ridge
    therefore pulls W* towards W (not towards 0) on directions the calibration data does not
    cover, and with X~ == X it gives W* = W exactly, so this reduces to ``whitened_factorize``.

    ``spectrum`` is that of (G^a) W* L: its tail is the error *above* the rank-independent
    floor ||W X - W* X~||^2, fine for ranking ranks of one matrix. ``G``/``out_exponent``
    add an optional output-side weight as in ``kfac_factorize`` (default off).
    """
    m, n = W.shape
    check_rank(rank, m, n)
    if C_tilde.shape != (n, n) or C_cross.shape != (n, n):
        raise ValueError(f"C_tilde and C_cross must be {n}x{n}, got {tuple(C_tilde.shape)} and {tuple(C_cross.shape)}")
    dtype = compute_dtype(W.device)
    # n x n temporaries are what bound memory here (n = 27,648 for OLMo-3-32B's down_proj: 3 GB each
    # in float32): damp in place, solve through the Cholesky factor, never form an inverse
    Ct = C_tilde.to(dtype)
    Ct = Ct + Ct.T
    Ct.mul_(0.5)
    lam = damp * torch.diagonal(Ct).mean().clamp_min(torch.finfo(dtype).tiny)
    Ct.diagonal().add_(lam)
    Cx = C_cross.to(dtype, copy=True)
    Cx.diagonal().add_(lam)
    rhs = Cx.T @ W.to(dtype).T  # W* Ct = W Cx  <=>  Ct W*^T = Cx^T W^T (Ct symmetric)
    del Cx
    L, info = torch.linalg.cholesky_ex(Ct)
    L = L if int(info) == 0 else None
    W_star = (torch.cholesky_solve(rhs, L) if L is not None else torch.linalg.solve(Ct, rhs)).T
    del rhs
    left, left_inv = _side_weight(G, out_exponent, damp, dtype)
    f = _whiten_right(W_star, rank, Ct, L, left=left, left_inv=left_inv)
    return Factorization(up=f.up.to(W.dtype), down=f.down.to(W.dtype), spectrum=f.spectrum)


def output_error(W: torch.Tensor, up: torch.Tensor, down: torch.Tensor, X: torch.Tensor,
                 X_tilde: torch.Tensor | None = None) -> float:
    """||W X - up down X~||_F^2 (X~ = X by default: ||(W - up down) X||_F^2); X is n x T."""
    dtype = compute_dtype(W.device)
    X = X.to(dtype)
    Xt = X if X_tilde is None else X_tilde.to(dtype)
    R = W.to(dtype) @ X - up.to(dtype) @ (down.to(dtype) @ Xt)
    return float((R * R).sum())
