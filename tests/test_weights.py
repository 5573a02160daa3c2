"""kasa_trl.weights: the (out, in) view of nn.Linear and Conv1D weights, the one place that knows their layouts."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kasa_trl.weights import (
    base_weight,
    check_base_weight,
    stores_transposed,
    to_storage_layout,
    weight_shape,
    write_base_weight,
)

OUT, IN = 3, 5


def _modules() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"linear": nn.Linear(IN, OUT), "conv1d": Conv1D(OUT, IN)}  # Conv1D(nf=out, nx=in)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_base_weight_is_an_out_in_view_of_the_parameter(kind):
    module = _modules()[kind]
    assert stores_transposed(module) == (kind == "conv1d")
    assert module.weight.shape == ((IN, OUT) if kind == "conv1d" else (OUT, IN))
    weight = base_weight(module)
    assert weight.shape == (OUT, IN) and weight_shape(module) == (OUT, IN)
    assert weight.data_ptr() == module.weight.data_ptr()  # a view: no copy
    x = torch.randn(2, IN)
    # (out, in) means y = x W^T (+ bias) for both layouts.
    torch.testing.assert_close(module(x), x @ weight.T + module.bias, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_write_base_weight_and_storage_layout_round_trip(kind):
    module = _modules()[kind]
    new = torch.arange(OUT * IN, dtype=torch.float32).reshape(OUT, IN)
    write_base_weight(module, new)
    assert torch.equal(base_weight(module), new)
    assert torch.equal(module.weight.data, to_storage_layout(module, new))
    assert torch.equal(to_storage_layout(module, to_storage_layout(module, new)), new)
    assert not module.weight.requires_grad or module.weight.grad is None


def test_weight_shape_of_a_partitioned_weight_reads_its_full_shape():
    module = _modules()["conv1d"]
    module.weight.data = torch.empty(0)  # what ZeRO-3 leaves outside a gather
    module.weight.ds_id, module.weight.ds_shape = 7, torch.Size([IN, OUT])
    assert weight_shape(module) == (OUT, IN)


def test_check_base_weight_names_the_module():
    check_base_weight(nn.Linear(2, 2).weight, "m")
    with pytest.raises(TypeError, match=r"^m holds a Parameter of dtype torch.int8: quantized or packed"):
        check_base_weight(nn.Parameter(torch.zeros(2, 2, dtype=torch.int8), requires_grad=False), "m")
    with pytest.raises(ValueError, match=r"^m has its weight on the meta device"):
        check_base_weight(nn.Linear(2, 2, device="meta").weight, "m")
