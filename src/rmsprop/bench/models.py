"""The parameter sets of real models, from their shapes alone (nothing is downloaded or built).

An optimizer step sees a model as a list of tensors: how many, how large, how the sizes spread
(a few big matrices, hundreds of small biases and norms). These are those lists for models people
train with RMSProp-like optimizers, written from the architectures' definitions.
"""

from __future__ import annotations

__all__ = ["MODELS", "resnet50", "gpt2_small", "lstm_lm"]

Shapes = tuple[tuple[int, ...], ...]


def _bn(c: int) -> list[tuple[int, ...]]:
    return [(c,), (c,)]  # BatchNorm weight and bias (running stats are buffers, not parameters)


def resnet50() -> Shapes:
    """ResNet-50 (He et al. 2016, torchvision's layout): 161 tensors, 25,557,032 parameters."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), *_bn(64)]
    in_c = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out_c = width * 4
        for b in range(blocks):
            shapes += [(width, in_c, 1, 1), *_bn(width), (width, width, 3, 3), *_bn(width)]
            shapes += [(out_c, width, 1, 1), *_bn(out_c)]
            if b == 0:  # the projection shortcut
                shapes += [(out_c, in_c, 1, 1), *_bn(out_c)]
            in_c = out_c
    shapes += [(1000, 2048), (1000,)]
    return tuple(shapes)


def gpt2_small() -> Shapes:
    """GPT-2 small (Radford et al. 2019; Hugging Face's layout, lm_head tied to wte): 148
    tensors, 124,439,808 parameters."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attention qkv, projection
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, MLP
    shapes += [(d,), (d,)]  # ln_f
    return tuple(shapes)


def lstm_lm() -> Shapes:
    """The "medium" LSTM language model of Zaremba et al. 2014 (2 layers of 650 units, 10k words,
    untied): 11 tensors, 19,780,400 parameters."""
    vocab, h = 10_000, 650
    shapes: list[tuple[int, ...]] = [(vocab, h)]
    for _ in range(2):
        shapes += [(4 * h, h), (4 * h, h), (4 * h,), (4 * h,)]  # weight_ih, weight_hh, bias_ih, bias_hh
    shapes += [(vocab, h), (vocab,)]
    return tuple(shapes)


MODELS = {"ResNet-50": resnet50, "GPT-2 small": gpt2_small, "LSTM LM": lstm_lm}
