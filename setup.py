from setuptools import setup

# The Triton kernels live in rlhf_fast/kernels/, not in a top-level kernels/ folder: Python
# run from a clone puts the clone on sys.path, where a folder `kernels/` shadows the
# `kernels` package on PyPI that `transformers` imports (its models then fail to build).
# `benchmarks/` is installed as `rlhf_fast.benchmarks` so that `rlhf-fast bench` finds its
# suites from any install, not only from a clone.
setup(
    name="rlhf-fast",
    version="0.1.0",
    description="Fused Triton kernels for RLHF training (PPO, GRPO, DPO) and thin trainers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["rlhf_fast", "rlhf_fast.ops", "rlhf_fast.reference", "rlhf_fast.trainers",
              "rlhf_fast.integrations",
              "rlhf_fast.kernels",
              "rlhf_fast.benchmarks"],
    package_data={"rlhf_fast": ["data/*.jsonl", "data/*.txt"]},
    package_dir={"rlhf_fast": "rlhf_fast", "rlhf_fast.benchmarks": "benchmarks"},
    install_requires=["torch>=2.7", "triton>=3.3", "transformers", "einops", "tqdm",
                      "datasets>=4", "pyyaml"],
    extras_require={
        # liger-kernel: its kernels run in the Triton interpreter, so CI gates the
        # benchmark's adapters to it (cut-cross-entropy's do not: GPU-only peer).
        # trl: pinned, since rlhf_fast.integrations.trl patches one of its internals.
        # tensorboard, peft: the trainers' report_to="tensorboard" and LoRA adapters.
        "test": ["pytest>=7", "pytest-benchmark>=4", "ruff", "matplotlib", "liger-kernel==0.8.5",
                 "trl==1.16.0", "tensorboard", "peft"],
        "tensorboard": ["tensorboard"],
        "peft": ["peft"],
        # trl: pinned, since its benchmark provider calls TRL's private fused-head function.
        "bench": ["pytest>=7", "pytest-benchmark>=4", "matplotlib", "liger-kernel>=0.8",
                  "cut-cross-entropy", "trl==1.16.0"],
        "plot": ["matplotlib"],
        "trl": ["trl>=1.15"],
    },
    entry_points={"console_scripts": ["rlhf-fast=rlhf_fast.cli:main"]},
)
