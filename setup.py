from setuptools import find_packages, setup

setup(
    name="s2moe_dist",
    version="0.1.0",
    description="S2MoE (Robust Sparse Mixture of Experts via Stochastic Learning) for DeepSpeed / Megatron",
    packages=find_packages(include=["s2moe_dist", "s2moe_dist.*"]),
    python_requires=">=3.9",
    # torch is pinned by launch_scripts/setup_env.sh's constraints file, never upgraded here.
    install_requires=["torch>=2.4", "numpy", "pyyaml", "tqdm"],
    extras_require={
        "deepspeed": ["deepspeed>=0.14"],
        "megatron": ["megatron-core>=0.8"],
        "mpi": ["mpi4py"],
        # what s2moe-train / s2moe-eval / the quickstart need (the trainer writes TensorBoard logs)
        "train": ["deepspeed>=0.14", "tensorboard"],
        "docs": ["mkdocs>=1.5", "mkdocs-material>=9", "mkdocstrings[python]>=0.24"],
        "dev": ["pytest", "pytest-timeout", "tensorboard", "matplotlib", "ruff"],
    },
    entry_points={
        "console_scripts": [
            "s2moe-train=s2moe_dist.cli:train_main",
            "s2moe-eval=s2moe_dist.cli:eval_main",
            "s2moe-ckpt=s2moe_dist.cli:ckpt_main",
        ]
    },
)
