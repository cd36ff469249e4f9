"""data2vec 1 pretraining (image, speech, text) on the data2vec 1 encoders of models/: the model and
loss (model.py), targets (targets.py), maskings (masks.py) and the published recipes (presets.py)."""
from .model import Data2Vec1

__all__ = ["Data2Vec1"]
