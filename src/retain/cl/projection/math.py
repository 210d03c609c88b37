"""Gradient projection as pure functions on flat tensors (checked by hand in tests/test_projection.py).

Notation: `grad` is the step's gradient g (a vector of p numbers), `refs` the reference gradients
G (a k x p matrix, one row per constraint). Products of p-vectors are accumulated in float64, in
slices of the p dimension so that no float64 copy of G is ever made whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Columns of G processed at once when accumulating in float64.
SLICE = 1 << 22


def gram_and_dots(refs: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`G G^T` (k x k) and `G g` (k), in float64 on the CPU."""
    k = refs.size(0)
    gram = torch.zeros(k, k, dtype=torch.float64, device=refs.device)
    dots = torch.zeros(k, dtype=torch.float64, device=refs.device)
    for start in range(0, refs.size(1), SLICE):
        part = refs[:, start : start + SLICE].double()
        gram += part @ part.T
        dots += part @ grad[start : start + SLICE].double()
    return gram.cpu(), dots.cpu()


def add_combination(grad: torch.Tensor, refs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`g + G^T w`, accumulated in float64 and returned in `grad`'s dtype (a new tensor)."""
    weights = weights.to(device=refs.device, dtype=torch.float64)
    out = torch.empty_like(grad)
    for start in range(0, grad.numel(), SLICE):
        part = grad[start : start + SLICE].double() + weights @ refs[:, start : start + SLICE].double()
        out[start : start + SLICE] = part.to(grad.dtype)
    return out


def solve_nonnegative_dual(
    gram: torch.Tensor, linear: torch.Tensor, max_rounds: int | None = None
) -> torch.Tensor:
    """The u >= 0 that minimises `1/2 u^T P u + c^T u` for a symmetric positive semi-definite P.

    This is the non-negative least-squares problem `min_{u >= 0} ||G^T u + g||^2` written with the
    Gram matrix P = G G^T and c = G g, solved by the Lawson-Hanson active-set method in float64: a
    variable enters the free set while the negative gradient `-(P u + c)` is positive for it; the
    free variables solve `P_FF u_F = -c_F` (least squares, so a singular P, such as two equal
    reference gradients, is fine); a step that would make a free variable negative stops at the
    bound and releases it. It ends in finitely many rounds with the exact minimiser (up to rounding).
    """
    P = gram.double().cpu()
    c = linear.double().cpu()
    k = c.numel()
    u = torch.zeros(k, dtype=torch.float64)
    scale = max(float(P.abs().max()) if k else 0.0, float(c.abs().max()) if k else 0.0)
    if scale == 0.0:
        return u
    tol = 1e-12 * scale
    free = torch.zeros(k, dtype=torch.bool)
    for _ in range(max_rounds or 3 * k + 10):
        slope = -(P @ u + c)
        entering = torch.where(~free & (slope > tol), slope, torch.full_like(slope, -torch.inf))
        if not bool(torch.isfinite(entering).any()):
            break
        free[int(entering.argmax())] = True
        for _ in range(3 * k + 10):  # inner loop: at least one variable leaves per pass
            index = free.nonzero().squeeze(1)
            trial = torch.zeros_like(u)
            trial[index] = torch.linalg.lstsq(P[index][:, index], -c[index].unsqueeze(1)).solution.squeeze(1)
            if bool((trial[index] > 0).all()):
                u = trial
                break
            # Move towards the trial point until the first free variable reaches 0; it leaves.
            ratios = {j: float(u[j] / (u[j] - trial[j])) for j in index[trial[index] <= 0].tolist()}
            first = min(ratios, key=ratios.__getitem__)
            u = u + ratios[first] * (trial - u)
            free[first] = False
            free &= u > 0
            u = torch.where(free, u, torch.zeros_like(u))
            if not bool(free.any()):
                break
    return u.clamp(min=0)


@dataclass
class Projection:
    """What a projection did: the gradient to apply, whether it changed, how many constraints were violated."""

    grad: torch.Tensor
    projected: bool
    violated: int


def gem_project(grad: torch.Tensor, refs: torch.Tensor, margin: float) -> Projection:
    """GEM's update: `g` itself when `<g, g_k> >= 0` for every reference gradient g_k; otherwise

        g~ = g + G^T v,   v = argmin_{v >= margin} 1/2 v^T G G^T v + (G g)^T v

    the dual of GEM's QP `min ||g~ - g||^2  s.t.  G g~ >= 0` with the original code's margin as a
    lower bound on every dual variable. Writing v = margin + u shows what the margin does: g~ is the
    exact projection of `g + margin * sum_k g_k` onto the cone `{x : G x >= 0}`, so every constraint
    holds (`<g~, g_k> >= 0`) and, for margin > 0, the update also leans towards every earlier task's
    gradient, including those g did not conflict with.
    """
    if refs.size(0) == 0:
        return Projection(grad, False, 0)
    gram, dots = gram_and_dots(refs, grad)
    violated = int((dots < 0).sum())
    if violated == 0:
        return Projection(grad, False, 0)
    ones = torch.ones_like(dots)
    shifted = dots + margin * (gram @ ones)  # G (g + margin * G^T 1)
    weights = solve_nonnegative_dual(gram, shifted) + margin
    return Projection(add_combination(grad, refs, weights), True, violated)


def agem_project(grad: torch.Tensor, ref: torch.Tensor) -> Projection:
    """A-GEM's update: `g - (g . r / r . r) r` when `g . r < 0`, else `g` (r: the one reference gradient)."""
    gram, dots = gram_and_dots(ref.reshape(1, -1), grad)
    dot, norm2 = float(dots[0]), float(gram[0, 0])
    if dot >= 0 or norm2 == 0.0:
        return Projection(grad, False, 0)
    weight = torch.tensor([-dot / norm2], dtype=torch.float64)
    return Projection(add_combination(grad, ref.reshape(1, -1), weight), True, 1)


def clip_to_norm(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """`grad` scaled down to norm `max_norm` when longer (the Trainer's rule, `max_norm / (norm + 1e-6)`)."""
    if max_norm <= 0:
        return grad
    norm = float(torch.linalg.vector_norm(grad.double()))
    factor = max_norm / (norm + 1e-6)
    return grad * factor if factor < 1 else grad
