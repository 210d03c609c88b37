"""InfLoRA's subspace math, as pure functions of float32 tensors (docs/methods/inflora.md).

Shapes: a layer's inputs X are [N, d] (N tokens); their covariance C = X^T X / N is [d, d]; the stored
basis M of earlier tasks' input directions is [d, k] with orthonormal columns (k = 0 before the first
task); a LoRA's down-projection A (peft's `lora_A.weight`) is [r, d]. "Energy" is the paper's: the
squared Frobenius norm of the inputs, i.e. the trace of C, split along directions by C's eigenvalues.
"""

from __future__ import annotations

import math

import torch

#: Row norm of a designed A: the expected row norm of peft's default (Kaiming-uniform) A, as in the
#: published InfLoRA code, so B trains at the step sizes a plain LoRA would.
ROW_NORM = 1.0 / math.sqrt(3.0)


def empty_basis(dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The stored subspace before any task: [d, 0]."""
    return torch.zeros(dim, 0, dtype=torch.float32, device=device)


def covariance(inputs: torch.Tensor) -> torch.Tensor:
    """`X^T X / N` of inputs [N, d], in float32 (the zero matrix for N = 0)."""
    x = inputs.float()
    return x.T @ x / max(x.shape[0], 1)


def complement(basis: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [d, d - k] of the orthogonal complement of span(basis) ([d, k])."""
    dim, kept = basis.shape
    if kept == 0:
        return torch.eye(dim, dtype=basis.dtype, device=basis.device)
    full, _ = torch.linalg.qr(basis, mode="complete")  # the first k columns span the basis
    return full[:, kept:]


def top_directions(cov: torch.Tensor, within: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigen-directions of `cov` restricted to span(within) ([d, m], orthonormal), strongest first.

    Returns (eigenvalues [m], clamped at 0; directions [d, m], orthonormal, inside span(within)).
    """
    restricted = within.T @ cov @ within
    restricted = (restricted + restricted.T) / 2  # exactly symmetric for eigh
    values, vectors = torch.linalg.eigh(restricted)  # ascending
    return values.flip(0).clamp(min=0), within @ vectors.flip(1)


def design_down_projection(cov: torch.Tensor, basis: torch.Tensor, rank: int) -> torch.Tensor:
    """InfLoRA's A for a new task: the top-`rank` eigenvectors of the task's input covariance projected
    onto the complement of the stored subspace (`P C P`, P = I - M M^T), as rows of norm ROW_NORM.

    Every row lies in the complement, so `A x = 0` for x in span(basis): the new LoRA `B A x` leaves the
    earlier tasks' stored input directions alone, whatever B becomes.
    """
    dim, kept = basis.shape
    if dim - kept < rank:
        raise ValueError(f"a rank-{rank} A needs {rank} free directions; the subspace leaves {dim - kept}")
    _, directions = top_directions(cov, complement(basis))
    return directions[:, :rank].T.contiguous() * ROW_NORM


def directions_to_add(captured: float, total: float, new_energies: torch.Tensor, threshold: float) -> int:
    """How many new directions (energies `new_energies`, strongest first) the stored subspace needs so that
    it holds at least `threshold` of the task's input energy `total`, of which it holds `captured` already.

    The smallest n with `captured + sum(new_energies[:n]) >= threshold * total` (0 when the subspace already
    holds enough; every direction when even all of them fall short through rounding).
    """
    if total <= 0 or captured >= threshold * total:
        return 0
    cumulative = captured + torch.cumsum(new_energies.double(), 0)
    reached = (cumulative >= threshold * total).nonzero()
    return int(reached[0, 0]) + 1 if len(reached) else len(new_energies)


def grow_basis(basis: torch.Tensor, cov: torch.Tensor, threshold: float, max_dim: int) -> torch.Tensor:
    """The stored subspace after a task (DualGPM's "remove" update, the paper's energy criterion).

    `cov` is the task's input covariance. The directions the basis misses are the eigenvectors of the
    projected covariance `P C P`; the strongest are appended until the basis holds `threshold` of the
    task's input energy (trace of C), and never beyond `max_dim` columns. Returns [d, k'] with k' >= k,
    the old columns first and unchanged.
    """
    kept = basis.shape[1]
    room = max_dim - kept
    if room <= 0:
        return basis
    total = float(torch.trace(cov).double())
    energies, directions = top_directions(cov, complement(basis))
    # The energy inside span(basis), trace(M^T C M); clamped, as rounding can take it a hair below 0.
    captured = min(max(total - float(energies.double().sum()), 0.0), total)
    count = min(directions_to_add(captured, total, energies, threshold), room)
    return torch.cat([basis, directions[:, :count]], dim=1) if count else basis
