"""The tiny model and data set the Hugging Face Trainer tests train (a helper module, not a test file)."""

import torch
import torch.nn.functional as F
from torch import nn


class TinyRegressor(nn.Module):
    """One linear layer ``fc``; returns the loss the Trainer reads from a dict."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        out = self.fc(x)
        return {"loss": F.mse_loss(out, labels), "logits": out}


def regression_rows(n: int) -> list[dict]:
    """``n`` rows ``{"x": 4 features, "labels": 1 target}``, a list the Trainer takes as its data set."""
    return [{"x": torch.randn(4), "labels": torch.randn(1)} for _ in range(n)]
