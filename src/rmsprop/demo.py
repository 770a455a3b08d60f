"""The seed document's example: SimpleNet regression trained with rmsprop.RMSprop."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["SimpleNet", "train_seed_example"]


class SimpleNet(nn.Module):
    """Linear(10, 50) - ReLU - Linear(50, 1), as in the seed document."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 50)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(50, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def train_seed_example(
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    *,
    epochs: int = 10,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> list[float]:
    """Train SimpleNet on 100 random samples with MSE; return the loss of every epoch.

    The model and data come from ``torch.manual_seed(seed)``, so two optimizers given the same
    seed see the same model and data.
    """
    torch.manual_seed(seed)
    model = SimpleNet()
    criterion = nn.MSELoss()
    optimizer = make_optimizer(model)
    X = torch.randn(100, 10)
    y = torch.randn(100, 1)
    losses = []
    for epoch in range(epochs):
        optimizer.zero_grad()
        loss = criterion(model(X), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log is not None:
            log(f"Epoch [{epoch + 1}/{epochs}], Loss: {loss.item():.4f}")
    return losses
