"""d2v_scale: data2vec 2.0 self-supervised pretraining (image, audio, text) at DeepSpeed scale."""
__version__ = "0.1.0"
