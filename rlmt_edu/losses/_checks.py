"""Validation and reduction helpers shared by every loss in ``rlmt_edu.losses``.

Two jobs only:

1. Check inputs at the public boundary and raise a ``ValueError`` that names the argument, what it got and
   what was expected (``check_*`` functions).
2. Make every reduction visible: the paper's sums and means go through ``masked_sum`` and ``masked_mean``,
   so a reader sees exactly which axis is summed and what it is divided by.

Shape legend used across the package: B batch, Q questions, G group size, T tokens, V vocabulary.
"""

from __future__ import annotations

import math
import numbers

import torch

Tensor = torch.Tensor


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


def check_tensor(name: str, x: object, *, ndim: int | None = None, floating: bool = True) -> Tensor:
    """Reject non-tensors, the wrong number of dimensions, and (for float tensors) NaN or inf."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {_describe(x)}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimension(s), got shape {tuple(x.shape)}")
    if floating and not torch.is_floating_point(x):
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if torch.is_floating_point(x) and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN or inf entries")
    return x


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b}: expected the same shape as {name_a} {tuple(a.shape)}, got {tuple(b.shape)}"
        )


def check_mask(name: str, mask: object, like_name: str, like: Tensor) -> Tensor:
    """A 0/1 mask (bool or numeric) of the same shape as ``like`` that selects at least one element
    in every row (every sample must have at least one response token). Returned as ``like``'s dtype."""
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of 0/1, got {_describe(mask)}")
    check_same_shape(like_name, like, name, mask)
    if mask.dtype != torch.bool:
        if torch.is_floating_point(mask) and not bool(torch.isfinite(mask).all()):
            raise ValueError(f"{name}: expected only 0 and 1, got NaN or inf")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name}: expected only 0 and 1, got values {mask.unique()[:6].tolist()}")
    if like.numel() == 0:
        raise ValueError(f"{like_name}: expected at least one sample with at least one token, got shape {tuple(like.shape)}")
    if mask.dim() >= 2:
        empty = (mask.reshape(mask.shape[0], -1) != 0).sum(dim=1) == 0
        if bool(empty.any()):
            rows = empty.nonzero().flatten()[:6].tolist()
            raise ValueError(
                f"{name}: expected at least one selected token per sample, got empty rows {rows}"
            )
    elif not bool((mask != 0).any()):
        raise ValueError(f"{name}: expected at least one selected element, got none")
    return mask.to(like.dtype)


def as_number(name: str, value: object) -> float:
    """A real number given as a Python int or float, a NumPy scalar, or a 0-dim tensor, as a Python float.

    Booleans are refused (True is not a step size), as are tensors with more than one element or a
    dimension: a hyperparameter is one number.
    """
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name}: expected a single real number, got {_describe(value)}")
        return float(value.detach().item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a single real number, got {_describe(value)}")
    return float(value)


def check_positive(name: str, value: object, *, allow_inf: bool = False) -> float:
    """A number > 0 (see ``as_number`` for the accepted types). +inf only where ``allow_inf`` says it means
    something (a clip range ε = inf is no clipping); elsewhere it would turn the loss into inf or NaN."""
    number = as_number(name, value)
    if not number > 0 or (math.isinf(number) and not allow_inf):
        want = "a number > 0 (inf allowed)" if allow_inf else "a finite number > 0"
        raise ValueError(f"{name}: expected {want}, got {number!r}")
    return number


def check_non_negative(name: str, value: object, *, allow_inf: bool = False) -> float:
    """A number >= 0; +inf only where ``allow_inf`` (as for ``check_positive``)."""
    number = as_number(name, value)
    if not number >= 0 or (math.isinf(number) and not allow_inf):
        want = "a number >= 0 (inf allowed)" if allow_inf else "a finite number >= 0"
        raise ValueError(f"{name}: expected {want}, got {number!r}")
    return number


def check_choice(name: str, value: object, choices: tuple) -> object:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over the entries where ``mask`` is 1 (all entries if ``dim`` is None)."""
    x = torch.where(mask != 0, x, torch.zeros_like(x)) * mask  # where(): a masked-out inf must not become NaN
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1: masked sum divided by the mask's count."""
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count


# ---- helpers added with the part-A losses (nll, preference, ..., trpo) ----


def check_not_empty(name: str, x: Tensor) -> Tensor:
    """Reject a tensor with no elements (a mean over nothing would be NaN)."""
    if x.numel() == 0:
        raise ValueError(f"{name}: expected at least one element, got shape {tuple(x.shape)}")
    return x


def check_logprob_values(name: str, x: Tensor, *, atol: float = 1e-5) -> Tensor:
    """Log-probabilities are <= 0 (a probability is at most 1); ``atol`` allows rounding error.

    Every function of ``rlmt_edu.losses`` that takes log-probabilities calls this one check, so the same
    mistake (passing logits, or a log-ratio, where log-probabilities belong) gets the same message everywhere.
    """
    if x.numel() and bool((x > atol).any()):
        raise ValueError(f"{name}: expected log-probabilities (<= 0), got a maximum of {float(x.max()):.6g}")
    return x


def check_prob_values(name: str, p: Tensor, *, allow_zero: bool = True) -> Tensor:
    """Every entry a probability: in [0, 1], or in (0, 1] when ``allow_zero`` is False."""
    low_ok = (p >= 0) if allow_zero else (p > 0)
    if not bool((low_ok & (p <= 1)).all()):
        want = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(
            f"{name}: expected probabilities in {want}, got range [{float(p.min()):.6g}, {float(p.max()):.6g}]"
        )
    return p


def check_prob_simplex(name: str, p: Tensor, *, atol: float = 1e-4) -> Tensor:
    """Probability distributions over the last dimension: entries >= 0 that sum to 1 (within ``atol``)."""
    if p.dim() == 0:
        raise ValueError(f"{name}: expected a distribution over the last dimension, got a 0-dim tensor")
    if bool((p < 0).any()):
        raise ValueError(f"{name}: expected non-negative probabilities, got a minimum of {float(p.min()):.6g}")
    total = p.sum(dim=-1)
    if not bool(((total - 1).abs() <= atol).all()):
        worst = float(total.flatten()[(total - 1).abs().flatten().argmax()])
        raise ValueError(f"{name}: expected each distribution to sum to 1 over the last dimension, got {worst:.6g}")
    return p


def check_scalar_between(name: str, value: object, low: float, high: float) -> float:
    """A real number in the closed interval [low, high] (see ``as_number`` for the accepted types)."""
    number = as_number(name, value)
    if not low <= number <= high:
        raise ValueError(f"{name}: expected a number in [{low}, {high}], got {number!r}")
    return number


def check_bool_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value
