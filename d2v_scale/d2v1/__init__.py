"""data2vec 1 pretraining (image, speech, text) on the data2vec 1 encoders of models/: the model and
loss (model.py: Data2Vec1), targets (targets.py), maskings (masks.py), the published recipes
(presets.py) and the reference checkpoints' key names (reference_keys.py)."""
