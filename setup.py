"""exo-align: EXO and DPO alignment of causal language models on DeepSpeed ZeRO.

The pipeline's entry points are scripts in src/ (run with `python src/<stage>.py` or the
`deepspeed` launcher); installing makes their shared `utils` package importable from
anywhere, e.g. from a custom dataset module or a notebook.
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
    package_dir={"": "src"},
    packages=find_packages("src"),
    py_modules=[p.stem for p in Path(__file__).parent.joinpath("src").glob("*.py")],
    install_requires=requirements,
    # bench: only exp/bench compares against TRL; see exp/bench/README.md for installing it
    # without letting pip move torch or transformers
    extras_require={"test": ["pytest>=7"], "bench": ["trl==1.16.0"]},
    license="MIT",
)
