"""Aggregation: weighted means over state dicts, integer buffers, keys kept local by module type."""

import pytest
import timm
import torch
from torch import nn

from harmofl.aggregation import (
    add_weighted_,
    client_weights,
    local_state_keys,
    mean_from_sum,
    merge_states,
    resolve_module_types,
    weighted_average,
    weighted_sum,
)


def _states():
    generator = torch.Generator().manual_seed(0)
    return [
        {"w": torch.randn(3, 2, generator=generator), "n": torch.tensor(k * 3 + 1), "h": torch.randn(4).half()}
        for k in range(3)
    ]


def test_weighted_average_is_the_formula():
    states, weights = _states(), [1.0, 2.0, 5.0]
    mean = weighted_average(states, weights)
    expected = sum(w * s["w"].double() for s, w in zip(states, weights)) / 8.0
    torch.testing.assert_close(mean["w"], expected.float())
    assert mean["w"].dtype == torch.float32 and mean["h"].dtype == torch.float16


def test_integer_buffers_are_rounded_to_nearest_and_keep_their_dtype():
    states = _states()  # num_batches_tracked-like counters 1, 4, 7
    mean = weighted_average(states, [1.0, 1.0, 2.0])
    assert mean["n"].dtype == torch.int64
    assert int(mean["n"]) == round((1 + 4 + 2 * 7) / 4)  # 4.75 -> 5, not truncated to 4


def test_split_sums_equal_one_sum():
    """Two processes summing their own clients and adding the sums give one process's mean."""
    states, weights = _states(), [1.0, 2.0, 5.0]
    like = states[0]
    part_a = weighted_sum(states[:1], weights[:1], like)
    part_b = weighted_sum(states[1:], weights[1:], like)
    combined = {key: part_a[key] + part_b[key] for key in like}
    split_mean = mean_from_sum(combined, 8.0, like)
    for key, value in weighted_average(states, weights).items():
        assert torch.equal(split_mean[key], value)


def test_add_weighted_accumulates_in_float64():
    like = {"w": torch.zeros(2)}
    total = weighted_sum([], [], like)
    assert total["w"].dtype == torch.float64 and torch.equal(total["w"], torch.zeros(2, dtype=torch.float64))
    add_weighted_(total, {"w": torch.tensor([1.0, 2.0])}, 3.0)
    assert torch.equal(total["w"], torch.tensor([3.0, 6.0], dtype=torch.float64))


def test_client_weights():
    assert client_weights([10, 30], "uniform") == [1.0, 1.0]
    assert client_weights([10, 30], "samples") == [10.0, 30.0]
    with pytest.raises(ValueError, match="'by_size'"):
        client_weights([1], "by_size")
    with pytest.raises(ValueError, match=r"\[10, 0\]"):
        client_weights([10, 0], "samples")


def test_local_keys_are_selected_by_module_type_on_a_timm_model():
    model = timm.create_model("test_resnet", pretrained=False, num_classes=2)
    keys = local_state_keys(model, resolve_module_types(["norm"]))
    norm_keys = {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._NormBase)
        for key in module.state_dict()
    }
    assert keys == norm_keys and keys
    assert any(key.endswith("num_batches_tracked") for key in keys)
    assert not any("conv" in key and key.endswith("weight") and key not in norm_keys for key in keys)
    assert local_state_keys(model, resolve_module_types(["Linear"])) == {"fc.weight", "fc.bias"}
    assert local_state_keys(model, ()) == set()


def test_unknown_module_type_is_rejected_with_the_name():
    with pytest.raises(ValueError, match="'BatchNormal'"):
        resolve_module_types(["BatchNormal"])


def test_merge_states_prefers_local_keys():
    merged = merge_states({"a": torch.zeros(1), "b": torch.zeros(1)}, {"b": torch.ones(1)})
    assert torch.equal(merged["a"], torch.zeros(1)) and torch.equal(merged["b"], torch.ones(1))
