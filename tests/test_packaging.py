"""What `pip install` puts where, and that a user's own utils.py shadows nothing of ours.

The shared package is src/utils in the source tree (imported by the entry scripts as `utils`)
and `exo_align` when installed; inside it every import is relative, so it works under either
name. Nothing here installs anything: the wheel is built into a temporary directory and read.
"""
import ast
import glob
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
from helpers import REPO_ROOT, SRC


def test_no_absolute_utils_import_inside_the_package():
    """`from utils.x import ...` inside src/utils breaks the installed `exo_align` (and lets a
    user's utils.py in); branches that add one are fixed by rerunning the relative-imports rewrite."""
    offenders = []
    for path in sorted((SRC / "utils").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n == "utils" or n.startswith("utils.") for n in names):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not offenders, f"absolute imports of utils inside the package: {offenders}"


@pytest.mark.slow
def test_wheel_installs_only_exo_align(tmp_path):
    """No `utils`, no `train_exo` ... at the top level of site-packages: only exo_align."""
    for name in ("setup.py", "README.md", "requirements.txt"):
        (tmp_path / "src_tree").mkdir(exist_ok=True)
        (tmp_path / "src_tree" / name).write_bytes((REPO_ROOT / name).read_bytes())
    subprocess.run(["cp", "-r", str(SRC), str(tmp_path / "src_tree" / "src")], check=True)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             str(tmp_path / "src_tree"), "-w", str(tmp_path / "wheel")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = glob.glob(str(tmp_path / "wheel" / "*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"exo_align"}
    package_files = {n for n in names if n.startswith("exo_align/")}
    expected = {"exo_align/" + str(p.relative_to(SRC / "utils")) for p in (SRC / "utils").rglob("*.py")}
    assert package_files == expected


def user_dir(tmp_path):
    """A working directory as a user has one: their own utils.py (and a dataset module)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "utils.py").write_text("USERS_OWN = True\n")
    return work


@pytest.mark.slow
def test_exo_align_imports_beside_a_user_utils_py(tmp_path):
    """Every module of the package imports as exo_align.* from a process whose sys.path has no
    src/ and whose working directory (first on sys.path) holds a user's utils.py."""
    site = tmp_path / "site"
    site.mkdir()
    os.symlink(SRC / "utils", site / "exo_align")  # what the wheel installs, without installing it
    code = textwrap.dedent(f"""
        import os, pkgutil, importlib, sys
        # an editable install of the repo may have put some src/ on sys.path: take every one out
        sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p, "utils", "fileio.py"))]
        sys.path.insert(1, {str(site)!r})
        import exo_align
        names = [m.name for m in pkgutil.walk_packages(exo_align.__path__, "exo_align.")]
        for name in names:
            importlib.import_module(name)
        import utils
        assert utils.USERS_OWN, utils
        print(len(names), "modules")
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=user_dir(tmp_path), capture_output=True, text=True,
                            timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-2]) >= 15  # the last line; DeepSpeed prints to stdout on import


@pytest.mark.slow
def test_stage_runs_beside_a_user_utils_py(tmp_path, tiny_model, align_data):
    """A stage started from a directory holding a user's utils.py trains; its --dataset_module
    may import the package as exo_align and registers into the registry the stage reads."""
    work = user_dir(tmp_path)
    (work / "my_datasets.py").write_text(textwrap.dedent("""
        import json
        from exo_align.data.raw_datasets import PromptRawDataset, register_dataset

        @register_dataset("my_pairs")
        class MyPairs(PromptRawDataset):
            kind = "pref"
            def load_split(self, split):
                return json.load(open(f"{self.path}/{split}.json"))
            def get_prompt(self, sample): return sample["prompt"]
            def get_chosen(self, sample): return sample["chosen"]
            def get_rejected(self, sample): return sample["rejected"]
    """))
    out = tmp_path / "sft"
    result = subprocess.run([sys.executable, str(SRC / "train_sft.py"), "--model_name_or_path", tiny_model,
                  "--dataset_module", "my_datasets.py", "--data_name_path", f"my_pairs:{align_data['pref']}",
                  "--max_seq_len", "32", "--max_gen_len", "16", "--max_iter_step", "1",
                  "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
                  "--data_output_path", str(tmp_path / "cache"), "--report_to", "none", "--output_dir", str(out)],
                            cwd=work, env={**os.environ, "PYTHONPATH": "."}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").exists()


@pytest.mark.slow
def test_generated_data_is_ignored_by_git():
    """The preprocessors' default outputs (exp/*/data/) and the trackers' local logs stay out of git."""
    paths = ["exp/imdb_exp/data/imdb_prefix10/train.json", "exp/tldr_exp/data/tldr/test.json",
             "exp/hh_exp/data/hh_chosen_sft/train.json", "wandb/offline-run-x/run.wandb", "tb_logs/run/events"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO_ROOT, capture_output=True,
                            text=True)
    assert sorted(result.stdout.split()) == sorted(paths)
