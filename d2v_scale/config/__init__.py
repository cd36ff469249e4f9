"""Typed configuration: one dataclass per concern (sections.py), the checks a run's settings must pass
(checks.py), dotted CLI overrides with type coercion and configs read back from JSON (keys.py).
Named configurations live in `presets.py`."""
from .checks import ALGORITHMS, MODALITIES, PLACEMENTS, ConfigError
from .keys import ALIASES, all_keys, apply_overrides, from_dict, from_json, set_key, suggest_key
from .sections import (SYNTHETIC_VOCAB, AudioConfig, Config, Data2Vec1Config, DataConfig, DecoderConfig, EvalConfig,
                       FinetuneConfig, ImageConfig, LMConfig, MaskConfig, ModelConfig, OptimConfig, RunConfig,
                       TeacherConfig, TextConfig, with_vocab)

__all__ = ["ALGORITHMS", "ALIASES", "MODALITIES", "PLACEMENTS", "SYNTHETIC_VOCAB", "AudioConfig", "Config", "ConfigError",
           "Data2Vec1Config", "DataConfig", "DecoderConfig", "EvalConfig", "FinetuneConfig", "ImageConfig", "LMConfig",
           "MaskConfig", "ModelConfig", "OptimConfig", "RunConfig", "TeacherConfig", "TextConfig", "all_keys",
           "apply_overrides", "from_dict", "from_json", "set_key", "suggest_key", "with_vocab"]
