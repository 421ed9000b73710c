import os
import sys

# Tests import the project's top-level modules (model, optimizers, data, ...) from the repo root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
