"""The frameworks people train with: each example in examples/ runs as a user would run it, and
Lightning's mixed precision with gradient clipping is checked in detail."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rmsprop

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# The timm example runs on timm's real registry loaded without torchvision (tests/timm_standin.py).
_TIMM_RUNNER = (
    "import runpy, sys; sys.path.insert(0, {tests!r}); import timm_standin\n"
    "with timm_standin.installed():\n"
    "    sys.argv = [{path!r}]; runpy.run_path({path!r}, run_name='__main__')\n"
)

EXAMPLE_RUNS = {
    "lightning_train.py": ([], ["Lightning, precision=bf16-mixed, gradient_clip_val=1.0: loss"]),
    "hf_trainer.py": ([], ["Trainer with optimizer_cls_and_kwargs: loss", "Trainer with optimizers=: loss"]),
    "sb3_a2c.py": (
        ["--timesteps", "500"],
        ["torch.optim.RMSprop: bit-identical policy parameters", "eps_in_sqrt=True, initial_square_avg=1.0"],
    ),
    "timm_create_optimizer.py": ([], ["rmspropxtimm: RMSprop(RMSprop)", "lookahead_rmspropxkeras: Lookahead"]),
}


def test_every_example_is_run_here():
    # fsdp_train: test_distributed; a3c_cartpole: test_examples
    assert {p.name for p in EXAMPLES.glob("*.py")} == {*EXAMPLE_RUNS, "fsdp_train.py", "a3c_cartpole.py"}


@pytest.mark.parametrize("name", list(EXAMPLE_RUNS))
def test_example_trains(name):
    args, expected = EXAMPLE_RUNS[name]
    path = str(EXAMPLES / name)
    if name.startswith("timm"):
        cmd = [sys.executable, "-c", _TIMM_RUNNER.format(tests=str(ROOT / "tests"), path=path)]
    else:
        cmd = [sys.executable, path, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for line in expected:
        assert line in result.stdout, result.stdout


class _Clipped:
    """The total norm of the gradients each step used (read after the step: Lightning passes step()
    a closure that runs backward and clips, so before the step there are none yet)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.norms: list[float] = []
        optimizer.register_step_post_hook(self)  # Lightning runs its closure (backward, clipping) inside step()

    def __call__(self, optimizer, args, kwargs) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())


def _lightning_run(precision: str, clip: float, **optimizer_kwargs):
    import pytorch_lightning as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
            self.losses, self.unclipped = [], []

        def training_step(self, batch, batch_idx):
            x, y = batch
            assert torch.is_autocast_enabled("cpu") == (precision == "bf16-mixed")
            loss = nn.functional.mse_loss(self.net(x).float(), y)
            self.losses.append(loss.item())
            return loss

        def on_before_optimizer_step(self, optimizer):  # before Lightning clips
            self.unclipped.append(torch.nn.utils.get_total_norm([p.grad for p in self.parameters()]).item())

        def configure_optimizers(self):
            opt = rmsprop.RMSprop(self.parameters(), lr=1e-2, **optimizer_kwargs)
            self.seen = _Clipped(opt)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2)}

    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = 3 * x[:, :1] + 1
    module = Module()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=6, precision=precision, gradient_clip_val=clip,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=32))
    return module, trainer


def test_lightning_bf16_mixed_with_gradient_clipping_trains_with_the_default_optimizer():
    """The default RMSprop (fused=None: the fused kernel on these CPU tensors) under
    precision="bf16-mixed" and gradient_clip_val: Lightning clips, the optimizer steps the
    clipped gradients, the scheduler runs, the loss falls."""
    module, trainer = _lightning_run("bf16-mixed", clip=0.5)
    opt = trainer.optimizers[0]
    assert type(opt) is rmsprop.RMSprop and opt.defaults["fused"] is None
    assert not opt._step_supports_amp_scaling  # as torch.optim.RMSprop: Lightning may clip
    assert len(module.seen.norms) == 48 and max(module.seen.norms) <= 0.5 * (1 + 1e-4)
    assert max(module.unclipped) > 1.0  # so the clipping above did something
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.1**3)  # StepLR(step_size=2), 6 epochs
    assert sum(module.losses[-8:]) < 0.2 * sum(module.losses[:8])


def test_lightning_refuses_clipping_only_where_the_step_unscales_itself():
    """fused=True takes grad_scale/found_inf inside its step, as torch's fused optimizers do, so
    Lightning refuses to clip the still-scaled gradients, with its own message."""
    with pytest.raises(RuntimeError, match="gradient clipping"):
        _lightning_run("bf16-mixed", clip=0.5, fused=True)
    module, _ = _lightning_run("bf16-mixed", clip=0.0, fused=True)  # no clipping: trains
    assert sum(module.losses[-8:]) < 0.2 * sum(module.losses[:8])
