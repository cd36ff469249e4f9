"""d2v_scale: data2vec 2.0 self-supervised pretraining (image, audio, text) at DeepSpeed scale.

`d2v_scale.load_encoder(path)` gives the encoder of any weights file, run directory or fairseq
checkpoint for downstream use (pretrained.py)."""
from .pretrained import PretrainedEncoder, load_encoder

__version__ = "0.1.0"
__all__ = ["PretrainedEncoder", "load_encoder"]
