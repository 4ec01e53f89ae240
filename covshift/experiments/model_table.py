"""A torchsummary-style table of a model: layers, output shapes, parameter counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerRow:
    """One leaf module as the forward pass met it."""

    name: str
    type: str
    output_shape: tuple[int, ...]
    params: int
    trainable: int
    buffers: int


@dataclass(frozen=True)
class ModelTable:
    """Per-layer rows and totals; ``str()`` gives the table.

    Non-trainable parameters are frozen parameters plus floating-point buffers
    (BatchNorm's running mean and variance); integer counters such as
    ``num_batches_tracked`` are not parameters and are not counted.
    """

    rows: tuple[LayerRow, ...]
    input_size: tuple[int, ...]

    @property
    def trainable(self) -> int:
        return sum(row.trainable for row in self.rows)

    @property
    def non_trainable(self) -> int:
        return sum(row.params - row.trainable + row.buffers for row in self.rows)

    @property
    def total(self) -> int:
        return self.trainable + self.non_trainable

    def __str__(self) -> str:
        rule, double = "-" * 80, "=" * 80
        lines = [rule, f"{'Layer (type)':>22} {'Name':<20} {'Output Shape':>22} {'Param #':>12}", double]
        for index, row in enumerate(self.rows, start=1):
            shape = str([-1, *row.output_shape[1:]])
            lines.append(f"{f'{row.type}-{index}':>22} {row.name:<20} {shape:>22} {row.params:>12,}")
        lines += [
            double,
            f"Input size: {list(self.input_size)}",
            f"Total params: {self.total:,}",
            f"Trainable params: {self.trainable:,}",
            f"Non-trainable params: {self.non_trainable:,}",
            rule,
        ]
        return "\n".join(lines)


def model_table(model: nn.Module, input_size: tuple[int, ...] = (1, 28, 28)) -> ModelTable:
    """Tabulate ``model`` like torchsummary: one row per leaf module, in forward order.

    Runs one batch of two zero inputs of shape ``input_size`` under ``no_grad`` in
    eval mode; every hook is removed and the training flags are put back.

    Args:
        model: the model to describe.
        input_size: the shape of one input, without the batch dimension.

    Returns:
        A :class:`ModelTable`; print it for the table.

    Raises:
        ValueError: ``input_size`` is empty or holds a non-positive size.

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    >>> table = model_table(net, input_size=(1, 8, 8))
    >>> table.trainable, table.non_trainable, table.rows[1].output_shape
    (48, 8, (2, 4, 6, 6))
    """
    if not input_size or any(not isinstance(n, int) or n < 1 for n in input_size):
        raise ValueError(f"input_size must be a non-empty tuple of positive ints, got {input_size!r}")
    rows: list[LayerRow] = []
    leaves = {module: name for name, module in model.named_modules() if next(module.children(), None) is None}

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        params = list(module.parameters(recurse=False))
        buffers = [b for b in module.buffers(recurse=False) if b.is_floating_point()]
        rows.append(
            LayerRow(
                name=leaves[module],
                type=type(module).__name__,
                output_shape=tuple(output.shape) if isinstance(output, torch.Tensor) else (),
                params=sum(p.numel() for p in params),
                trainable=sum(p.numel() for p in params if p.requires_grad),
                buffers=sum(b.numel() for b in buffers),
            )
        )

    modes = {module: module.training for module in model.modules()}
    handles = [module.register_forward_hook(record) for module in leaves]
    try:
        model.eval()
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(2, *input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return ModelTable(rows=tuple(rows), input_size=tuple(input_size))
