"""The reference model pair and the torchsummary-style table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from covshift.experiments import model_table, reference_pair
from covshift.experiments.models import CONVS, N_CLASSES


def _conv_params(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def test_parameter_counts_are_exact_and_on_target() -> None:
    plain, bn = reference_pair(seed=1)
    convs = sum(_conv_params(cin, cout, k) for _, cin, cout, k in CONVS) + _conv_params(CONVS[-1][2], N_CLASSES, 3)
    gamma_beta = 2 * sum(cout for _, _, cout, _ in CONVS)
    assert sum(p.numel() for p in plain.parameters() if p.requires_grad) == convs
    assert sum(p.numel() for p in bn.parameters() if p.requires_grad) == convs + gamma_beta
    assert abs(convs - 48_800) <= 0.01 * 48_800
    assert abs(convs + gamma_beta - 49_300) <= 0.01 * 49_300
    assert model_table(plain).trainable == convs and model_table(plain).non_trainable == 0
    assert model_table(bn).trainable == convs + gamma_beta
    assert model_table(bn).non_trainable == gamma_beta  # running mean and var: one each per channel


def test_second_module_is_batchnorm_16_with_32_trainable_parameters() -> None:
    _, bn = reference_pair(seed=1)
    rows = model_table(bn).rows
    assert rows[1].type == "BatchNorm2d" and rows[1].output_shape[1] == 16
    assert rows[1].trainable == 32 and rows[1].buffers == 32
    assert rows[0].type == "Conv2d"


def test_batchnorm_is_the_only_difference() -> None:
    plain, bn = reference_pair(seed=3)
    bn_modules = dict(bn.named_modules())
    without_bn = {name: type(m) for name, m in bn_modules.items() if not isinstance(m, nn.BatchNorm2d)}
    assert without_bn == {name: type(m) for name, m in plain.named_modules()}
    inserted = [name for name, m in bn_modules.items() if isinstance(m, nn.BatchNorm2d)]
    assert inserted == [f"{name}.bn" for name, *_ in CONVS]  # every convolution but the classifier
    plain_state = plain.state_dict()
    for key, value in bn.state_dict().items():
        if ".bn." not in key:
            assert torch.equal(value, plain_state[key]), key
    assert set(plain_state) <= set(bn.state_dict())
    convs = [name for name, m in plain.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 7 and convs[-1] == "classifier"


def test_both_compute_the_same_function_at_init_up_to_batch_normalization() -> None:
    plain, bn = reference_pair(seed=2)
    x = torch.randn(4, 1, 28, 28)
    for name in ("block1", "block2"):
        bn.get_submodule(name).bn.eval()  # fresh running stats: mean 0, var 1 -> near identity
    with torch.no_grad():
        a = plain.block1.conv(x)
        b = bn.block1.bn(bn.block1.conv(x))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_seed_controls_weights_and_global_rng_is_untouched() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _ = reference_pair(seed=1)
    b, _ = reference_pair(seed=1)
    c, _ = reference_pair(seed=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.block3.conv.weight, b.block3.conv.weight)
    assert not torch.equal(a.block3.conv.weight, c.block3.conv.weight)


def test_model_table_text_and_cleanup() -> None:
    _, bn = reference_pair(seed=1)
    bn.train()
    bn.block2.eval()
    hooks_before = sum(len(m._forward_hooks) for m in bn.modules())
    table = model_table(bn)
    text = str(table)
    assert "Layer (type)" in text and "Output Shape" in text and "Param #" in text
    assert "BatchNorm2d-2" in text and "[-1, 16, 26, 26]" in text
    assert f"Trainable params: {table.trainable:,}" in text
    assert f"Non-trainable params: {table.non_trainable:,}" in text
    assert table.rows[-1].output_shape == (2, N_CLASSES)
    assert sum(len(m._forward_hooks) for m in bn.modules()) == hooks_before
    assert bn.training and not bn.block2.training and not bn.block2.bn.training and bn.block1.bn.training


def test_model_table_rejects_a_bad_input_size() -> None:
    plain, _ = reference_pair(seed=1)
    with pytest.raises(ValueError, match=r"input_size .* got \(1, 0, 28\)"):
        model_table(plain, input_size=(1, 0, 28))
