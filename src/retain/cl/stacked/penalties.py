"""The regularisers of stacked-LoRA methods, as pure functions of the LoRA matrices.

Shapes follow peft: a LoRA's `A` is `lora_A.weight`, [r, in]; its `B` is `lora_B.weight`, [out, r];
the update it adds to a layer is `scale * B @ A`, [out, in]. Every function sums over the target
modules (the lists hold one entry per module, in the same order); none normalises by a count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def overlap(earlier: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """`sum(|earlier @ current^T|)` for one module: every entry of the [R, r] matrix of inner products
    (over the input dimension) between the rows of the earlier tasks' A (stacked along the rank
    dimension, [R, in]) and the rows of the current A ([r, in])."""
    return (earlier @ current.T).abs().sum()


def orthogonal_loss(earlier: Sequence[torch.Tensor], current: Sequence[torch.Tensor]) -> torch.Tensor:
    """O-LoRA's term: sum over modules m and earlier tasks i of `sum(|A_i^m A_t^m^T|)`.

    `earlier[m]` is `cat([A_1^m, ..., A_{t-1}^m])` ([(t-1) r, in]); `current[m]` is `A_t^m`.
    """
    if len(earlier) != len(current):
        raise ValueError(f"{len(earlier)} earlier and {len(current)} current matrices")
    return torch.stack([overlap(h, a) for h, a in zip(earlier, current, strict=True)]).sum()


def squared_frobenius(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`sum_m ||T_m||_F^2`: the sum of every squared entry of every tensor."""
    return torch.stack([t.pow(2).sum() for t in tensors]).sum()


class _ProductL1(torch.autograd.Function):
    """`sum(|B @ A|)` without keeping the [out, in] product for backward: it is recomputed there, so
    the memory held between forward and backward is A and B only (one product per module at a time).
    The gradient is torch's for `abs` (sign, 0 at 0): dB = S A^T, dA = B^T S with S = sign(B A)."""

    @staticmethod
    def forward(ctx, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(b, a)
        return (b @ a).abs().sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        b, a = ctx.saved_tensors
        sign = torch.sign(b @ a) * grad
        grad_b = sign @ a.T if ctx.needs_input_grad[0] else None
        grad_a = b.T @ sign if ctx.needs_input_grad[1] else None
        return grad_b, grad_a


def product_l1(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """`||B A||_1`, the entrywise L1 norm of one module's update direction B @ A ([out, in])."""
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"B {tuple(b.shape)} and A {tuple(a.shape)} do not multiply")
    return _ProductL1.apply(b, a)


def sparsity_loss(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor]) -> torch.Tensor:
    """N-LoRA's term: sum over modules of `||B_t A_t||_1`."""
    if len(bs) != len(as_):
        raise ValueError(f"{len(bs)} B and {len(as_)} A matrices")
    return torch.stack([product_l1(b, a) for b, a in zip(bs, as_, strict=True)]).sum()
