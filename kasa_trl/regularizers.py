"""The regularizer registry and the built-in KaSA regularizers.

A regularizer is a pure function of one KaSA layer's factors::

    fn(lora_A (r, in), lora_B (out, r), lora_diag (r,)) -> scalar tensor

The registry is a dict plus a decorator (in the spirit of timm's ``register_model``); configs pick entries by
name. The trainer weights each registered term, reduces it over layers (``sum`` as in the paper and PEFT, or
``mean`` as in the official code) and adds it to the task loss (KaSA paper Eq. 9-12)::

    L = L_task + sum_name weight[name] * reduce_layers(fn_name(A, B, sigma))
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .factors import orthogonality_error

Regularizer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

REDUCTIONS = ("sum", "mean")

_REGISTRY: dict[str, Regularizer] = {}


def register_regularizer(name: str) -> Callable[[Regularizer], Regularizer]:
    """Register ``fn(lora_A, lora_B, lora_diag) -> scalar`` under ``name``.

    Example::

        @register_regularizer("diag_to_one")
        def diag_to_one(lora_A, lora_B, lora_diag):
            return (lora_diag - 1).pow(2).sum()

    Raises:
        ValueError: if ``name`` is empty or already registered.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"regularizer name must be a non-empty string, got {name!r}")

    def decorator(fn: Regularizer) -> Regularizer:
        if name in _REGISTRY:
            raise ValueError(
                f"regularizer {name!r} is already registered (by {_qualname(_REGISTRY[name])}); "
                "pick another name or call unregister_regularizer first"
            )
        if not callable(fn):
            raise TypeError(f"register_regularizer({name!r}) expects a function, got {type(fn).__name__}")
        _check_signature(name, fn)
        _REGISTRY[name] = fn
        return fn

    return decorator


def unregister_regularizer(name: str) -> None:
    """Remove ``name`` from the registry (for tests and interactive sessions)."""
    if name not in _REGISTRY:
        raise KeyError(f"regularizer {name!r} is not registered; known: {registered_regularizers()}")
    del _REGISTRY[name]


def registered_regularizers() -> list[str]:
    """Sorted names of every registered regularizer."""
    return sorted(_REGISTRY)


def get_regularizer(name: str) -> Regularizer:
    """The function registered under ``name``; a ``ValueError`` lists the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown regularizer {name!r}; registered: {registered_regularizers()}. "
            "Register your own with @kasa_trl.register_regularizer(name) before building the KaSAConfig."
        ) from None


def validate_regularizer_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Check names are registered and weights finite and >= 0; return a plain ``dict[str, float]``."""
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"regularizers must be a mapping name -> weight, e.g. {{'singular_value_l2': 1e-4}}; "
            f"got {type(weights).__name__}"
        )
    checked: dict[str, float] = {}
    for name, weight in weights.items():
        if not isinstance(name, str):
            raise TypeError(f"regularizers keys must be regularizer names (str), got {name!r}")
        get_regularizer(name)
        # numbers.Real: Python and NumPy ints and floats; not bools, strings or tensors.
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(
                f"regularizer weight for {name!r} must be a number, got {weight!r} ({type(weight).__name__}); "
                f"pass e.g. {{{name!r}: 1e-3}}"
            )
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"regularizer weight for {name!r} must be finite and >= 0, got {weight}; "
                "use 0 (or drop the entry) to switch a term off"
            )
        checked[name] = float(weight)
    return checked


def evaluate_regularizer(
    name: str,
    fn: Regularizer,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_diag: torch.Tensor,
    *,
    layer: str,
    needs_grad: bool,
) -> torch.Tensor:
    """``fn(lora_A, lora_B, lora_diag)`` as a 0-dim floating tensor on the factors' device; anything else a
    regularizer may return (a Python number, an integer or non-scalar tensor, a tensor cut from the factors'
    graph when ``needs_grad``) is a ``TypeError`` naming the regularizer and ``layer``; an exception it raises
    is re-raised as a ``RuntimeError`` naming them too (chained to the original; out-of-memory errors pass as they
    are). Checks metadata only: no device synchronization."""
    where = f"regularizer {name!r} ({_qualname(fn)}) on {layer}"
    try:
        value = fn(lora_A, lora_B, lora_diag)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise  # kept as they are: callers recognize them by type (e.g. to retry with a smaller batch)
    except Exception as error:
        raise RuntimeError(
            f"{where} raised {type(error).__name__}: {error}; fix the regularizer, or drop {name!r} from "
            "KaSAConfig.regularizers"
        ) from error
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{where} returned {value!r} ({type(value).__name__}); it must return a scalar torch.Tensor computed "
            "from lora_A, lora_B, lora_diag with torch operations (no .item(), float() or NumPy), so its "
            "gradient reaches the factors"
        )
    if value.numel() != 1:
        raise TypeError(
            f"{where} returned a tensor of shape {tuple(value.shape)}; it must return a scalar (reduce it, e.g. "
            ".sum() or .mean())"
        )
    if not value.is_floating_point():
        raise TypeError(
            f"{where} returned a {value.dtype} tensor; it must return a floating-point scalar (integer values "
            "carry no gradient): compute it from the factors without rounding or casting to an integer dtype"
        )
    if value.device != lora_A.device:
        raise TypeError(
            f"{where} returned a tensor on {value.device}, not on the factors' device {lora_A.device}; compute "
            "it from the factors without moving it"
        )
    if needs_grad and not value.requires_grad:
        raise TypeError(
            f"{where} returned a tensor that is not connected to lora_A, lora_B, lora_diag (requires_grad=False), "
            "so it would add nothing to training; compute it from the factors with torch operations (no "
            ".detach(), .item(), torch.tensor(...) or torch.no_grad())"
        )
    return value.reshape(())


def _check_signature(name: str, fn: Callable[..., Any]) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables have none: checked when called
        return
    try:
        signature.bind(None, None, None)
    except TypeError:
        raise TypeError(
            f"register_regularizer({name!r}): {_qualname(fn)}{signature} cannot be called as "
            "fn(lora_A, lora_B, lora_diag); a regularizer takes the three factors as positional arguments"
        ) from None


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


@register_regularizer("singular_value_l2")
def singular_value_l2(lora_A: torch.Tensor, lora_B: torch.Tensor, lora_diag: torch.Tensor) -> torch.Tensor:
    """``||sigma||_2^2``: the L2 penalty on the learned singular values (KaSA paper Eq. 10)."""
    return lora_diag.to(torch.promote_types(lora_diag.dtype, torch.float32)).pow(2).sum()


@register_regularizer("orthogonality")
def orthogonality(lora_A: torch.Tensor, lora_B: torch.Tensor, lora_diag: torch.Tensor) -> torch.Tensor:
    """``||B^T B - I_r||_F + ||A A^T - I_r||_F`` (KaSA paper Eq. 11-12, PEFT 0.21), not squared."""
    error_a, error_b = orthogonality_error(lora_A, lora_B)
    return error_b + error_a


@register_regularizer("orthogonality_official")
def orthogonality_official(
    lora_A: torch.Tensor, lora_B: torch.Tensor, lora_diag: torch.Tensor
) -> torch.Tensor:
    """The official code's ``||A^T A - I_in||_F + ||B B^T - I_out||_F``, in r x r form.

    ``A^T A`` shares its r non-zero eigenvalues with ``A A^T`` and has ``in - r`` zeros, so
    ``||A^T A - I_in||_F^2 = ||A A^T - I_r||_F^2 + (in - r)``: the same value with no (in x in) matrix.
    """
    r, n_in = lora_A.shape
    n_out = lora_B.shape[0]
    a_err, b_err = orthogonality_error(lora_A, lora_B)
    return torch.sqrt(a_err.pow(2) + (n_in - r)) + torch.sqrt(b_err.pow(2) + (n_out - r))
