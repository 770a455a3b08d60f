import os
import sys

# Keras must pick its backend before its first import; the parity tests run it on torch.
os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, os.path.dirname(__file__))
