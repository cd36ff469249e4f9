"""Hugging Face transformers in and out: `Data2VecVisionModel`, `Data2VecAudioModel` and
`Data2VecTextModel` folders (what `save_pretrained` writes: config.json + model.safetensors) to and
from d2v_scale encoders. Key names and math mirror transformers `models/data2vec/modeling_data2vec_
{vision,audio,text}.py`; nothing here imports transformers (reading and writing a folder needs its
JSON and safetensors only; loading the exported folder is transformers' `AutoModel.from_pretrained`).

* `d2v import-hf FOLDER OUT.safetensors`: a data2vec 1 encoder (models/beit.py, wav2vec2.py,
  roberta.py) with its config, for `--run.init_from`, `d2v finetune --init`, `d2v probe --init`;
  `--algorithm data2vec2`: the data2vec 2.0 text encoder (or audio encoder without ALiBi) instead.
  A `RobertaModel` folder reads as `Data2VecTextModel` (the same layout), a `BeitModel` folder as
  `Data2VecVisionModel` (the same math; transformers 5 renamed BEiT's weights, both namings read).
  Task models' folders (`...ForImageClassification`, `...ForCTC`, `...ForMaskedLM`) give their
  encoder; their heads and poolers are left out (named in the summary).
* `d2v export SOURCE OUT_DIR --format hf`: a data2vec 1 encoder, or a data2vec 2.0 encoder where
  one maps exactly (text: RoBERTa-shaped; audio without ALiBi), as the matching transformers class.

  configs.py   config.json <-> Config, and why an encoder has no transformers counterpart
  keys.py      tensor names both ways (q/k/v split from our fused qkv, RoBERTa's token types folded)
  folders.py   reading and writing the folders: the two commands
"""
from .configs import HFError
from .folders import export_hf, import_hf

__all__ = ["HFError", "export_hf", "import_hf"]
