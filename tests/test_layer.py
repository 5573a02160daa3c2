import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from kasa_trl import KaSALinear
from kasa_trl.decomposition import minor_components
from kasa_trl.factors import truncate

torch.manual_seed(0)


def _linear(out_features: int, in_features: int, dtype=torch.float32, conv1d: bool = False) -> nn.Module:
    if conv1d:
        layer = Conv1D(out_features, in_features)
        nn.init.normal_(layer.bias)
    else:
        layer = nn.Linear(in_features, out_features)
    return layer.to(dtype)


def _weight(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach()
    return w.T.clone() if isinstance(layer, Conv1D) else w.clone()


def _kasa(layer: nn.Module, r: int = 3, base_mode: str = "in_place", **kwargs) -> KaSALinear:
    left, right = minor_components(_weight(layer), r, "svd")
    return KaSALinear(layer, left, right, r=r, lora_alpha=2 * r, base_mode=base_mode, **kwargs)


def _randomize(layer: KaSALinear, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_params().values():
            p.copy_(torch.randn(p.shape, generator=gen))


def _reference(x, weight, bias):
    return x.double() @ weight.double().T + bias.double()


SHAPES = [(6, 10), (8, 8), (12, 5)]


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
def test_init_output_is_truncated_base(conv1d, shape, base_mode):
    base = _linear(*shape, conv1d=conv1d)
    w = _weight(base)
    bias = base.bias.detach().clone()
    layer = _kasa(base, base_mode=base_mode)
    w_trunc = truncate(w.double(), layer.removed_left.double(), layer.removed_right.double())
    x = torch.randn(4, shape[1])
    torch.testing.assert_close(layer(x).double(), _reference(x, w_trunc, bias), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(layer.delta_weight()) == 0


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
@pytest.mark.parametrize("leading", [(5,), (2, 3), (2, 1, 3)])
def test_output_with_random_factors(conv1d, shape, base_mode, leading):
    base = _linear(*shape, conv1d=conv1d)
    w, bias = _weight(base), base.bias.detach().clone()
    layer = _kasa(base, base_mode=base_mode)
    _randomize(layer)
    a, b, d = (p.detach().double() for p in layer.adapter_params().values())
    delta = layer.scaling * (b * d) @ a
    assert delta.shape == w.shape
    torch.testing.assert_close(layer.delta_weight().double(), delta, rtol=1e-5, atol=1e-6)
    w_trunc = truncate(w.double(), layer.removed_left.double(), layer.removed_right.double())
    x = torch.randn(*leading, shape[1])
    out = layer(x)
    assert out.shape == (*leading, shape[0])
    torch.testing.assert_close(out.double(), _reference(x, w_trunc + delta, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
def test_merge_unmerge_round_trip(conv1d, base_mode):
    base = _linear(9, 7, conv1d=conv1d)
    layer = _kasa(base, base_mode=base_mode)
    _randomize(layer)
    x = torch.randn(3, 7)
    expected = layer(x)
    before = base.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), before, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("conv1d", [False, True])
def test_modes_agree_and_non_destructive_keeps_weight(conv1d):
    torch.manual_seed(3)
    base_a = _linear(10, 6, conv1d=conv1d)
    base_b = _linear(10, 6, conv1d=conv1d)
    base_b.load_state_dict(base_a.state_dict())
    original = base_b.weight.detach().clone()
    in_place, non_destructive = _kasa(base_a), _kasa(base_b, base_mode="non_destructive")
    _randomize(in_place)
    _randomize(non_destructive)
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(in_place(x), non_destructive(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(base_b.weight, original)
    assert torch.equal(non_destructive.original_weight(), _weight(base_b))
    torch.testing.assert_close(
        in_place.original_weight(), non_destructive.original_weight(), rtol=1e-6, atol=1e-6
    )


def test_dropout_acts_on_adapter_input_only():
    base = _linear(8, 6)
    layer = _kasa(base, lora_dropout=0.5)
    _randomize(layer)
    x = torch.randn(64, 6)
    layer.eval()
    deterministic = layer(x)
    layer.train()
    torch.manual_seed(0)
    noisy = layer(x)
    assert not torch.allclose(noisy, deterministic)
    with torch.no_grad():
        layer.lora_B.zero_()
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # no adapter: dropout has no effect


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_mixed_dtypes_low_precision_base_fp32_adapter(base_dtype):
    base = _linear(16, 12, dtype=base_dtype)
    w = _weight(base).double()
    layer = _kasa(base, r=4)
    assert layer.lora_A.dtype == torch.float32 and layer.removed_left.dtype == torch.float32
    assert base.weight.dtype == base_dtype
    _randomize(layer)
    x = torch.randn(3, 12, dtype=base_dtype)
    out = layer(x)
    assert out.dtype == base_dtype and torch.isfinite(out).all()
    expected = _reference(x, w - layer.removed_weight().double() + layer.delta_weight().double(), base.bias)
    torch.testing.assert_close(out.double(), expected, rtol=5e-2, atol=5e-2)
    loss = out.float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.adapter_params().values())


def test_rslora_scaling():
    layer = _kasa(_linear(8, 8), r=4, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / 2)


def test_gradients_flow_to_adapter_only():
    base = _linear(8, 6)
    base.requires_grad_(False)
    layer = _kasa(base)
    _randomize(layer)
    layer(torch.randn(4, 6)).sum().backward()
    assert all(p.grad is not None for p in layer.adapter_params().values())
    assert base.weight.grad is None


def test_rejects_unsupported_base_and_bad_factors():
    with pytest.raises(TypeError, match="nn.Linear or Conv1D"):
        KaSALinear(nn.Embedding(4, 4), torch.zeros(4, 1), torch.zeros(1, 4), r=1, lora_alpha=1)
    with pytest.raises(ValueError, match="do not fit"):
        KaSALinear(nn.Linear(4, 6), torch.zeros(4, 1), torch.zeros(1, 4), r=1, lora_alpha=1)


# "stacked": non-destructive mode's one-pass path (kasa_trl.stacked); "separate": the general path, forced.
PATHS = [("in_place", "separate"), ("non_destructive", "stacked"), ("non_destructive", "separate")]


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize(("base_mode", "path"), PATHS)
@pytest.mark.parametrize("leading", [(5,), (2, 3)])
@pytest.mark.parametrize("input_grad", [True, False])
def test_forward_and_gradients_equal_the_plain_formula(
    conv1d, base_mode, path, leading, input_grad, monkeypatch
):
    """The fused forward (addmm into the base output, scaling folded into sigma; in non-destructive mode the
    removal and the adapter stacked into one pair of products) computes, in float64,
    ``x (W - left right)^T + scaling ((x A^T) * sigma) B^T + bias`` and its gradients."""
    base = _linear(9, 7, dtype=torch.float64, conv1d=conv1d)
    w, bias = _weight(base), base.bias.detach().clone()
    layer = _kasa(base, base_mode=base_mode)
    assert layer.lora_A.dtype == layer.removed_left.dtype == torch.float64  # one dtype: the addmm path
    if path == "separate":
        monkeypatch.setattr(layer, "_one_pass", lambda x, out: False)
    _randomize(layer)
    seen = []  # the hook gets the adapter's activation: (..., r), or (N, n + r) when stacked
    layer.penalty_hook = lambda _, h: seen.append(h.shape) or h
    left, right = layer.removed_left, layer.removed_right
    a, b, d = (p.detach().clone().requires_grad_() for p in layer.adapter_params().values())
    x = torch.randn(*leading, 7, dtype=torch.float64, requires_grad=input_grad)
    x_ref = x.detach().clone().requires_grad_(input_grad)
    expected = x_ref @ (w - left @ right).T + layer.scaling * ((x_ref @ a.T) * d) @ b.T + bias
    out = layer(x)
    assert out.shape == (*leading, 9) and out.dtype == torch.float64
    n_rows = torch.Size(leading).numel()
    assert seen == ([(n_rows, layer.n_removed + layer.r)] if path == "stacked" else [(*leading, layer.r)])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(expected)
    out.backward(grad_out)
    expected.backward(grad_out)
    for param, ref in zip(layer.adapter_params().values(), (a, b, d), strict=True):
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-10, atol=1e-10)
    if input_grad:
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    assert left.grad is None and right.grad is None


@settings(max_examples=40, deadline=None)
@given(
    out_features=st.integers(1, 10),
    in_features=st.integers(1, 10),
    r=st.integers(1, 5),
    n_removed=st.integers(0, 6),
    rows=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    frozen_adapter=st.booleans(),
)
def test_stacked_path_equals_the_separate_products(
    out_features, in_features, r, n_removed, rows, seed, frozen_adapter
):
    """Any shapes, any number of removed components (0 included, as the official truncation may remove fewer than
    r), adapter trained or frozen: the stacked products give the separate ones' output and gradients (float64)."""
    gen = torch.Generator().manual_seed(seed)
    n = min(n_removed, out_features, in_features)
    base = nn.Linear(in_features, out_features).double()
    left = torch.randn(out_features, n, generator=gen, dtype=torch.float64)
    right = torch.randn(n, in_features, generator=gen, dtype=torch.float64)
    layer = KaSALinear(base, left, right, r=r, lora_alpha=3.0, base_mode="non_destructive")
    _randomize(layer, seed)
    layer.requires_grad_(not frozen_adapter)
    x = torch.randn(rows, in_features, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(rows, out_features, generator=gen, dtype=torch.float64)
    results = []
    for one_pass in (True, False):
        layer._one_pass = lambda x, out, one_pass=one_pass: one_pass
        layer.zero_grad()
        x_ = x.clone().requires_grad_()
        out = layer(x_)
        out.backward(grad_out)
        results.append([out.detach(), x_.grad, *(p.grad for p in layer.adapter_params().values())])
    for stacked, separate in zip(*results, strict=True):
        torch.testing.assert_close(stacked, separate, rtol=1e-10, atol=1e-10)


def test_stacked_path_only_when_both_terms_read_the_same_input():
    """Active dropout (the adapter reads dropout(x), the removal x), mixed dtypes or autocast take the separate
    products; dropout in eval mode does not."""
    layer = _kasa(_linear(8, 6), base_mode="non_destructive", lora_dropout=0.5)
    x = torch.randn(4, 6)
    out = layer.base_layer(x).reshape(-1, 8)
    assert not layer._one_pass(x, out)
    layer.eval()
    assert layer._one_pass(x, out)
    assert not layer._one_pass(x.double(), out.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._one_pass(x, out)
    layer.train()
    layer.lora_dropout = nn.Identity()
    assert layer._one_pass(x, out)


def test_non_destructive_dropout_acts_on_adapter_input_only():
    """With dropout in training, non-destructive mode still removes R x from the undropped input."""
    base = _linear(8, 6, dtype=torch.float64)
    layer = _kasa(base, base_mode="non_destructive", lora_dropout=0.5)
    _randomize(layer)
    x = torch.randn(64, 6, dtype=torch.float64)
    torch.manual_seed(3)
    noisy = layer(x)
    torch.manual_seed(3)
    dropped = layer.lora_dropout(x)
    w_trunc = _weight(base) - layer.removed_weight()
    expected = x @ w_trunc.T + dropped @ layer.delta_weight().T + base.bias
    torch.testing.assert_close(noisy, expected.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
def test_adapter_disabled_and_one_dimensional_input(conv1d, base_mode):
    base = _linear(9, 7, dtype=torch.float64, conv1d=conv1d)
    w, bias = _weight(base), base.bias.detach().clone()
    layer = _kasa(base, base_mode=base_mode)
    _randomize(layer)
    w_trunc = w - layer.removed_left @ layer.removed_right
    x = torch.randn(7, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (9,)
    torch.testing.assert_close(out, x @ (w_trunc + layer.delta_weight()).T + bias, rtol=1e-10, atol=1e-10)
    layer.adapter_enabled = False
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ w_trunc.T + bias, rtol=1e-10, atol=1e-10)


# --- arguments checked before the base weight is touched (direct users of KaSALinear) -------------------------------


def _factors(out_features=6, in_features=6, n=1):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(out_features, n, generator=gen), torch.randn(n, in_features, generator=gen)


BAD_LAYER_ARGS = [
    (dict(r=0), ValueError, r"r must be a positive integer, got 0"),
    (dict(r=2.0), ValueError, r"r must be a positive integer, got 2\.0"),
    (dict(r=True), ValueError, r"r must be a positive integer, got True"),
    (dict(lora_alpha=float("nan")), ValueError, r"lora_alpha must be a finite number > 0, got nan"),
    (dict(lora_alpha=float("inf")), ValueError, r"lora_alpha must be a finite number > 0, got inf"),
    (dict(lora_alpha=0), ValueError, r"lora_alpha must be a finite number > 0, got 0"),
    (dict(lora_alpha="16"), ValueError, r"lora_alpha must be a finite number > 0, got '16'"),
    (dict(lora_dropout=1.0), ValueError, r"lora_dropout must be a number in \[0, 1\), got 1\.0"),
    (dict(lora_dropout=float("nan")), ValueError, r"lora_dropout must be a number in \[0, 1\), got nan"),
    (dict(use_rslora="yes"), ValueError, r"use_rslora must be True or False, got 'yes'"),
    (
        dict(base_mode="inplace"),
        ValueError,
        r"base_mode='inplace' is not one of \['in_place', 'non_destructive'\]",
    ),
    (
        dict(adapter_dtype=torch.int8),
        TypeError,
        r"adapter_dtype must be a floating-point dtype, got torch\.int8",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_LAYER_ARGS)
def test_bad_layer_arguments_are_refused_with_the_weight_untouched(kwargs, error, message):
    base = nn.Linear(6, 6)
    before = base.weight.detach().clone()
    args = {"r": 2, "lora_alpha": 4.0, **kwargs}
    with pytest.raises(error, match=message):
        KaSALinear(base, *_factors(), **args)
    assert torch.equal(base.weight, before)


def _nan_left():
    left, right = _factors()
    left[2, 0] = float("nan")
    return left, right


def _inf_right():
    left, right = _factors()
    right[0, 3] = float("-inf")
    return left, right


BAD_FACTORS = {
    "nan": (
        _nan_left,
        ValueError,
        r"KaSALinear: removed_left holds non-finite values \(NaN/Inf\); they would reach",
    ),
    "inf": (_inf_right, ValueError, r"KaSALinear: removed_right holds non-finite values"),
    "integer": (
        lambda: (torch.ones(6, 1, dtype=torch.int32), torch.ones(1, 6)),
        TypeError,
        r"KaSALinear: removed_left has dtype torch\.int32; the removed factors must be floating point",
    ),
    "one-dimensional": (
        lambda: (torch.ones(6), torch.ones(1, 6)),
        ValueError,
        r"removed_left must be a 2-D tensor",
    ),
    "not-a-tensor": (
        lambda: ([[1.0]] * 6, torch.ones(1, 6)),
        ValueError,
        r"removed_left must be a 2-D tensor, got list",
    ),
    "rank-too-high": (
        lambda: _factors(n=7),
        ValueError,
        r"removed factors \(6, 7\) @ \(7, 6\) do not fit a \(6, 6\) weight \(expected \(out, n\) @ \(n, in\) with n <= "
        r"min\(out, in\)\)",
    ),
    "overflow-fp32": (
        lambda: (torch.full((6, 1), 1e300, dtype=torch.float64), torch.ones(1, 6, dtype=torch.float64)),
        ValueError,
        r"the removed factors overflow torch\.float32",
    ),
}


@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
@pytest.mark.parametrize("case", list(BAD_FACTORS))
def test_bad_removed_factors_are_refused_with_the_weight_untouched(case, base_mode):
    make, error, message = BAD_FACTORS[case]
    base = nn.Linear(6, 6)
    before = base.weight.detach().clone()
    with pytest.raises(error, match=message):
        KaSALinear(base, *make(), r=2, lora_alpha=4.0, base_mode=base_mode)
    assert torch.equal(base.weight, before)


def test_meta_and_quantized_bases_are_refused():
    with pytest.raises(ValueError, match=r"base layer \(Linear\) has its weight on the meta device"):
        KaSALinear(nn.Linear(6, 6, device="meta"), *_factors(), r=2, lora_alpha=4.0)
    base = nn.Linear(6, 6)
    base.weight = nn.Parameter(torch.ones(6, 6, dtype=torch.int8), requires_grad=False)
    with pytest.raises(
        TypeError, match=r"holds a Parameter of dtype torch\.int8: quantized or packed weights"
    ):
        KaSALinear(base, *_factors(), r=2, lora_alpha=4.0)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("base_mode", ["in_place", "non_destructive"])
def test_original_weight_of_a_merged_layer_adds_the_removed_part_back(conv1d, base_mode):
    """Merged, the base holds W - R + dW in either mode: the original is that - dW + R (a merged non-destructive
    layer used to give W - R)."""
    base = _linear(9, 7, dtype=torch.float64, conv1d=conv1d)
    w = _weight(base)
    layer = _kasa(base, base_mode=base_mode)
    _randomize(layer)
    layer.merge()
    torch.testing.assert_close(layer.original_weight(), w, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize(
    ("base_mode", "merged"), [("in_place", False), ("in_place", True), ("non_destructive", True)]
)
def test_restore_base_keeps_the_output_and_truncate_base_undoes_it(conv1d, base_mode, merged):
    base = _linear(9, 7, dtype=torch.float64, conv1d=conv1d)
    w = _weight(base)
    layer = _kasa(base, base_mode=base_mode)
    _randomize(layer)
    x = torch.randn(4, 7, dtype=torch.float64)
    expected = layer(x)
    if merged:
        layer.merge()
    layer.restore_base()
    assert layer.base_mode == "non_destructive" and not layer.merged
    torch.testing.assert_close(_weight(base), w, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    layer.truncate_base()
    assert layer.base_mode == "in_place"
    torch.testing.assert_close(_weight(base), w - layer.removed_weight(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="truncate_base needs an unmerged non-destructive KaSA layer"):
        layer.truncate_base()


def test_merge_with_a_non_finite_adapter_changes_nothing():
    base = _linear(8, 6)
    layer = _kasa(base)
    _randomize(layer)
    with torch.no_grad():
        layer.lora_diag[1] = float("inf")
    before = base.weight.detach().clone()
    with pytest.raises(
        ValueError, match=r"KaSA layer: lora_diag hold non-finite values \(NaN/Inf\); merge would"
    ):
        layer.merge()
    assert not layer.merged and torch.equal(base.weight, before)
