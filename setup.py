from setuptools import find_packages, setup

setup(
    name="gpas-megatron",
    version="0.1.0",
    description=(
        "Pretrain Llama-style models with GPAS and ten normalization baselines on Megatron-Core"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # Held to 3.10 by the linter (ruff target-version); tested on 3.11 (CPU) and 3.12 (GPU).
    python_requires=">=3.10",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
    ],
    packages=find_packages(include=["megatron_ext", "megatron_ext.*"]),
    install_requires=[
        "megatron-core==0.16.1",
        "torch>=2.6",
        "numpy",
        "sentencepiece",
        "psutil",  # megatron-core's dist_checkpointing needs it but does not declare it
        "pyyaml",
        "orjson",  # fast JSON-lines parsing in preprocessing (falls back to json)
        "tqdm",
        "tokenizers",  # Hugging Face tokenizer files in preprocessing
    ],
    entry_points={
        "console_scripts": [
            "gpas-pretrain=megatron_ext.cli.pretrain:main",
            "gpas-preprocess-data=megatron_ext.cli.preprocess_data:main",
            "gpas-preprocess-sft=megatron_ext.cli.preprocess_sft:main",
            "gpas-train-tokenizer=megatron_ext.cli.train_tokenizer:main",
            "gpas-run-grid=megatron_ext.cli.run_grid:main",
            "gpas-grid-table=megatron_ext.cli.grid_table:main",
            "gpas-depth-analysis=megatron_ext.cli.depth_analysis:main",
            "gpas-downstream-eval=megatron_ext.cli.downstream_eval:main",
            "gpas-convert-to-hf=megatron_ext.cli.convert_to_hf:main",
            "gpas-convert-from-hf=megatron_ext.cli.convert_from_hf:main",
            "gpas-plot-run=megatron_ext.cli.plot_run:main",
        ]
    },
    extras_require={
        # Hugging Face export/import; the modeling code uses the transformers 5 API.
        "hf": ["transformers>=5.0,<6", "safetensors", "tokenizers", "protobuf"],
        "wandb": ["wandb"],
        "tensorboard": ["tensorboard"],
        # lm-evaluation-harness pinned: its task prompts and metrics change between releases, and
        # the downstream table names the version it ran
        "eval": ["lm-eval==0.4.13", "accelerate"],
        "zst": ["zstandard"],  # .zst inputs to preprocessing
        "plot": ["matplotlib"],
        # --hang-timeout: NVIDIA's resiliency extension, its rank monitor (CPU-safe)
        "resilience": ["nvidia-resiliency-ext==0.4.1"],
        # Everything the test suite imports. (mistral-common, whose real SentencePiece model
        # file the tests use, is installed without its dependencies by run_tests.sh.)
        "test": [
            "pytest",
            "pytest-xdist",
            "ruff",
            "matplotlib",
            "transformers>=5.0,<6",
            "safetensors",
            "tokenizers",
            "protobuf",
            "wandb",
            "tensorboard",
            "lm-eval==0.4.13",
            "accelerate",
            "zstandard",
            "nvidia-resiliency-ext==0.4.1",
        ],
    },
)
