"""Linear algebra on low-rank updates held as factors (B, A), B (out, r) and A (r, in).

Nothing here forms the (out, in) matrix B A. Everything runs in float64 on small r x r problems:

- thin SVD of B A: B = Q_B R_B and A^T = Q_A R_A, then the SVD of the r x r core R_B R_A^T
  (thin_svd: Householder QR; svd_from_grams: the same R factors from the Gram matrices B^T B and A A^T,
  so that one GEMM per target serves every layer, level and pair, see TargetSpace in report.py);
- inner products <B1 A1, B2 A2>_F = trace((B1^T B2)(A2 A1^T)) = sum((B1^T B2) * (A1 A2^T));
- the Gram matrix of many updates at once: one (sum r) x (sum r) problem, block-summed.

Why the Gram route: on CPU, torch's QR of an (11008, 112) float64 matrix takes 0.6-1.6 s (forming Q
dominates), the Gram matrix 0.02 s; a 7B adapter has hundreds of such matrices. The price: singular
values below about 1e-7 of the largest come out at round-off level instead of exactly (see GRAM_RTOL).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

DTYPE = torch.float64

GRAM_RTOL = 1e-14
"""svd_from_grams drops the eigen-directions of B^T B (A A^T) below GRAM_RTOL times the largest
eigenvalue, i.e. directions of B (A) whose singular value is below 1e-7 of its largest."""

RANK_RTOL = 1e-6
"""Directions whose singular value is below RANK_RTOL times the largest one count as absent: they
define the numerical rank, and they are left out of the subspaces compared by subspace_overlap."""


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the many small (r x r) decompositions on one thread: on CPU, torch's eigh/svd of a 112 x 112
    matrix take ~3 ms on one thread and 10-90 ms on two busy ones. The caller's setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def numerical_rank(s: torch.Tensor) -> int:
    """How many of the descending singular values s exceed RANK_RTOL times the largest."""
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 0
    return int((s > float(s[0]) * RANK_RTOL).sum())


@dataclass
class LowRankSVD:
    """B A = U diag(S) V^T with U (out, k), S (k,) descending, V (in, k); k = min(r, out, in)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def numerical_rank(self) -> int:
        return numerical_rank(self.S)

    def basis(self, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(orthonormal basis, singular values) of the column space (side "column", output side) or
        row space (side "row", input side), truncated to the numerical rank."""
        k = self.numerical_rank
        return (self.U if side == "column" else self.V)[:, :k], self.S[:k]


def thin_svd(B: torch.Tensor, A: torch.Tensor) -> LowRankSVD:
    """The SVD of B A from QR(B) and QR(A^T): only an r x r SVD, whatever out and in are."""
    B, A = B.to(DTYPE), A.to(DTYPE)
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)}: inner dimensions differ")
    if B.shape[1] == 0:
        return LowRankSVD(B.new_zeros(B.shape[0], 0), B.new_zeros(0), B.new_zeros(A.shape[1], 0))
    Qb, Rb = torch.linalg.qr(B)        # Qb (out, kb), Rb (kb, r)
    Qa, Ra = torch.linalg.qr(A.T)      # Qa (in, ka), Ra (ka, r)
    u, s, vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return LowRankSVD(Qb @ u, s, Qa @ vh.T)


@dataclass
class GramSVD:
    """B A = U diag(S) V^T with U = B @ WB and V = A^T @ WA: the singular vectors as coefficients on the
    factors' columns, so that U1^T U2 = WB1^T (B1^T B2) WB2 needs only Gram blocks. S is padded with
    zeros to `length` (min(r, out, in)); WB, WA have one column per non-zero singular value."""

    S: torch.Tensor
    WB: torch.Tensor
    WA: torch.Tensor

    @property
    def numerical_rank(self) -> int:
        return numerical_rank(self.S)

    def coefficients(self, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(coefficients, singular values) of the column (side "column") or row (side "row") space,
        truncated to the numerical rank."""
        k = self.numerical_rank
        return (self.WB if side == "column" else self.WA)[:, :k], self.S[:k]


def _half(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, V lambda^-1/2) with gram = R^T R, R (k, r) of full row rank k: the R of a QR factorisation
    up to an orthogonal factor, and the coefficients that map the factor's columns to orthonormal ones."""
    lam, vec = torch.linalg.eigh(gram)
    keep = lam > max(float(lam[-1]), 0.0) * GRAM_RTOL if lam.numel() else lam > 0
    lam, vec = lam[keep], vec[:, keep]
    return (vec * torch.sqrt(lam)).T, vec / torch.sqrt(lam)


def svd_from_grams(gb: torch.Tensor, ga: torch.Tensor, length: int) -> GramSVD:
    """The SVD of B A from gb = B^T B and ga = A A^T (both r x r)."""
    rb, cb = _half(gb.to(DTYPE))
    ra, ca = _half(ga.to(DTYPE))
    r = gb.shape[0]
    if rb.shape[0] == 0 or ra.shape[0] == 0:
        return GramSVD(torch.zeros(length, dtype=DTYPE), torch.zeros(r, 0, dtype=DTYPE), torch.zeros(r, 0, dtype=DTYPE))
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    S = torch.zeros(length, dtype=DTYPE)
    k = min(length, s.numel())
    S[:k] = s[:k]
    return GramSVD(S, (cb @ u)[:, :k], (ca @ vh.T)[:, :k])


def overlap_stats(M: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, n: int) -> dict | None:
    """subspace_overlap's numbers from M = U1^T U2 (orthonormal bases of numerical rank) and the
    singular values s1, s2 that go with the basis vectors; n is the ambient dimension."""
    k1, k2 = M.shape
    if k1 == 0 or k2 == 0:
        return None
    cos = torch.linalg.svdvals(M)
    w12 = float(((M.T * s1) ** 2).sum() / (s1 * s1).sum())    # update 1's energy inside span(U2)
    w21 = float(((M * s2) ** 2).sum() / (s2 * s2).sum())      # update 2's energy inside span(U1)
    return {
        "mean_sq_cos": min(1.0, float((cos * cos).sum()) / min(k1, k2)),
        "max_cos": min(1.0, float(cos[0])),
        "weighted": min(1.0, 0.5 * (w12 + w21)),
        "chance": min(1.0, max(k1, k2) / n),
    }


def energy_topk(s: torch.Tensor | Sequence[float]) -> dict[str, float] | None:
    """Share of sum(s^2) in the top k values, k = 1, 2, 4, ... and len(s). None for a zero update."""
    s = torch.as_tensor(s, dtype=DTYPE)
    total = float((s * s).sum())
    if total == 0.0:
        return None
    cum = torch.cumsum(s * s, 0) / total
    ks, k = [], 1
    while k < len(s):
        ks.append(k)
        k *= 2
    ks.append(len(s))
    return {str(k): min(1.0, float(cum[k - 1])) for k in ks}


def effective_rank(s: torch.Tensor | Sequence[float]) -> float:
    """Roy & Vetterli (2007): exp of the Shannon entropy of p_i = s_i / sum(s). 0 for a zero update;
    k for k equal non-zero values; between 1 and the rank otherwise."""
    s = torch.as_tensor(s, dtype=DTYPE)
    s = s[s > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p)).sum()))


def spectrum_stats(svd: LowRankSVD | GramSVD) -> dict:
    """The report's per-update numbers."""
    s = svd.S
    return {
        "singular_values": [float(x) for x in s],
        "energy": energy_topk(s),
        "effective_rank": effective_rank(s),
        "numerical_rank": svd.numerical_rank,
        "frobenius_norm": math.sqrt(float((s * s).sum())),
    }


def update_inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> float:
    """<B1 A1, B2 A2>_F without forming either matrix."""
    B1, A1, B2, A2 = (t.to(DTYPE) for t in (B1, A1, B2, A2))
    return float(((B1.T @ B2) * (A1 @ A2.T)).sum())


def gram_of_updates(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """K[p, q] = <B_p A_p, B_q A_q>_F for all pairs at once: (B_all^T B_all) * (A_all A_all^T), summed
    over the (r_p, r_q) blocks. Costs (out + in) (sum r)^2; every B must have the same out, every A the same in."""
    if not factors:
        return torch.zeros(0, 0, dtype=DTYPE)
    B_all = torch.cat([B.to(DTYPE) for B, _ in factors], dim=1)
    A_all = torch.cat([A.to(DTYPE) for _, A in factors], dim=0)
    return block_sum((B_all.T @ B_all) * (A_all @ A_all.T), [B.shape[1] for B, _ in factors])


def block_sum(h: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Sum a (sum sizes) x (sum sizes) matrix over its (sizes[p], sizes[q]) blocks: an n x n matrix."""
    n = len(sizes)
    if n == 0:
        return torch.zeros(0, 0, dtype=DTYPE)
    seg = torch.repeat_interleave(torch.arange(n), torch.as_tensor(list(sizes)))
    rows = torch.zeros(n, h.shape[1], dtype=DTYPE).index_add_(0, seg, h.to(DTYPE))
    return torch.zeros(n, n, dtype=DTYPE).index_add_(1, seg, rows)


def cosine_from_gram(K: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix from a Gram matrix; NaN where an update is zero."""
    d = torch.sqrt(torch.clamp(torch.diagonal(K), min=0.0))
    denom = d[:, None] * d[None, :]
    out = torch.full_like(K, float("nan"))
    ok = denom > 0
    out[ok] = torch.clamp(K[ok] / denom[ok], -1.0, 1.0)
    return out


def subspace_overlap(svd1: LowRankSVD, svd2: LowRankSVD, side: str) -> dict | None:
    """How much two updates share their column (output) or row (input) space.

    mean_sq_cos: mean of cos^2 over the min(k1, k2) principal angles = ||U1^T U2||_F^2 / min(k1, k2);
                 1 when one subspace contains the other, 0 when they are orthogonal.
    max_cos:     cosine of the smallest principal angle (1: they share at least one direction).
    weighted:    the same question weighted by energy: the mean over both directions of the share of one
                 update's squared singular values that lies inside the other's subspace.
    chance:      E[mean_sq_cos] for random subspaces of the same dimensions, max(k1, k2) / n.
    None when either update is zero."""
    U1, s1 = svd1.basis(side)
    U2, s2 = svd2.basis(side)
    return overlap_stats(U1.T @ U2, s1, s2, U1.shape[0])
