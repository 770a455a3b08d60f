"""PyTorch Lightning with rmsprop.RMSprop: configure_optimizers, a scheduler, bf16 mixed precision
and gradient clipping, on a tiny regression model (CPU, a few seconds).

    python examples/lightning_train.py                       # bf16-mixed, gradient_clip_val=1.0
    python examples/lightning_train.py --preset keras        # any preset, through from_preset
    python examples/lightning_train.py --precision 32-true   # full precision

Gradient clipping under mixed precision works with the default optimizer (fused=None), as with
torch.optim.RMSprop: Lightning refuses to clip only for an optimizer that unscales gradients
inside its own step (``_step_supports_amp_scaling``), which this one does only with fused=True,
as torch's fused optimizers do.
"""

from __future__ import annotations

import argparse
import sys

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rmsprop


class Regressor(pl.LightningModule):
    def __init__(self, preset: str | None = None, lr: float = 1e-2, steps: int = 100) -> None:
        super().__init__()
        self.preset, self.lr, self.steps = preset, lr, steps
        self.net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 1))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        if self.preset is None:
            optimizer = rmsprop.RMSprop(self.parameters(), lr=self.lr, alpha=0.9, momentum=0.5)
        else:
            optimizer = rmsprop.from_preset(self.preset, self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(rmsprop.PRESETS), default=None)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient_clip_val")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(512, 10)
    y = x @ torch.randn(10, 1) + 0.1 * torch.randn(512, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = Regressor(args.preset, steps=args.epochs * len(loader))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        precision=args.precision,
        gradient_clip_val=args.clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    first, last = sum(model.losses[:16]) / 16, sum(model.losses[-16:]) / 16
    print(f"Lightning, precision={args.precision}, gradient_clip_val={args.clip}: loss {first:.4f} -> {last:.4f}")
    return {"first": first, "last": last, "optimizer": trainer.optimizers[0]}


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["last"] < 0.5 * result["first"] else "the loss did not fall by half")
