"""Hugging Face Trainer with rmsprop.RMSprop, both ways Trainer takes a custom optimizer, on a tiny
BERT built from a config: no hub downloads (HF_HUB_OFFLINE=1), CPU, a few seconds.

    python examples/hf_trainer.py            # optimizer_cls_and_kwargs, then optimizers=

- ``optimizer_cls_and_kwargs=(rmsprop.RMSprop, {...})``: Trainer builds the optimizer itself,
  over its own parameter groups (no weight decay on biases and LayerNorm weights).
- ``optimizers=(optimizer, scheduler)``: you build both, here a preset and a warmup schedule.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing from the hub, ever
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import sys  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

import rmsprop  # noqa: E402

STEPS = 20


class FirstToken(Dataset):
    """Random token sequences labelled by their first token: learnable in a few dozen steps."""

    def __init__(self, n: int = 256, length: int = 12, vocab: int = 8, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, vocab, (n, length), generator=gen)
        self.labels = (self.ids[:, 0] > vocab // 2).long()  # first token decides: easy, fast

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=2,
    )
    return BertForSequenceClassification(config)


def train(out: str, **trainer_kwargs) -> tuple[Trainer, list[float]]:
    model = trainer_kwargs.pop("model")
    args = TrainingArguments(
        output_dir=out, max_steps=STEPS, per_device_train_batch_size=16, logging_steps=5,
        weight_decay=0.01, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=FirstToken(), **trainer_kwargs)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return trainer, losses


def main() -> dict[str, list[float]]:
    results = {}
    with tempfile.TemporaryDirectory() as out:
        trainer, losses = train(
            out, model=tiny_bert(), optimizer_cls_and_kwargs=(rmsprop.RMSprop, {"lr": 3e-3, "alpha": 0.9})
        )
        built = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
        assert type(built) is rmsprop.RMSprop and len(built.param_groups) == 2  # decay / no decay
        results["optimizer_cls_and_kwargs"] = losses

        model = tiny_bert()
        optimizer = rmsprop.from_preset("keras", model.parameters(), lr=3e-3)
        scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=5, num_training_steps=STEPS)
        _, losses = train(out, model=model, optimizers=(optimizer, scheduler))
        results["optimizers="] = losses
    for how, losses in results.items():
        print(f"Trainer with {how}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return results


if __name__ == "__main__":
    results = main()
    sys.exit(0 if all(ls[-1] < ls[0] for ls in results.values()) else "the loss did not fall")
