"""kamal's safetensors reader (tensor bytes straight into the network) against the library's
own: the same values bit for bit, conversions where the dtypes differ, and clear errors for
files that are not weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kamal import ModelRepoError
from kamal.weights import load_weights


def test_values_equal_safetensors_own_reader_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    source[1].running_mean.normal_()  # buffers (and the int64 counter) travel too
    source[1].num_batches_tracked.fill_(7)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    target = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    load_weights(target, tmp_path / "w.safetensors", "the test net")
    expected = load_file(str(tmp_path / "w.safetensors"))
    for key, value in target.state_dict().items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key


def test_other_dtypes_are_converted_into_the_networks(tmp_path):
    source = nn.Linear(5, 3).to(torch.bfloat16)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    target = nn.Linear(5, 3)
    load_weights(target, tmp_path / "w.safetensors", "the test net")
    assert target.weight.dtype == torch.float32
    assert torch.equal(target.weight, source.weight.float())


def test_names_and_shapes_must_match(tmp_path):
    save_file(nn.Linear(5, 3).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelRepoError, match="do not match the test net: wrong shape: weight"):
        load_weights(nn.Linear(5, 4), tmp_path / "w.safetensors", "the test net")
    with pytest.raises(ModelRepoError, match="missing: 0.bias, 0.weight; unexpected: bias, weight"):
        load_weights(nn.Sequential(nn.Linear(5, 3)), tmp_path / "w.safetensors", "the test net")


@pytest.mark.parametrize("damage, message", [
    (lambda data: b"\xff" * 8 + data[8:], "bad header length"),
    (lambda data: data[:8] + b"[" + data[9:], "bad header"),
    (lambda data: data[:-4], "is malformed"),  # the last tensor's bytes run past the end
    (lambda data: b"PK\x03\x04 not weights", "bad header length"),
])
def test_a_damaged_file_is_a_clear_error(tmp_path, damage, message):
    save_file(nn.Linear(5, 3).state_dict(), str(tmp_path / "w.safetensors"))
    path = tmp_path / "w.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ModelRepoError, match=message):
        load_weights(nn.Linear(5, 3), path, "the test net")
