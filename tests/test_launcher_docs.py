"""What the documentation (README.md or a docs/ page) says a launcher passes is what the launcher passes."""
import re

from helpers import REPO_ROOT


def test_readme_states_the_align_launchers_defaults():
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    (readme,) = [text for text in (p.read_text() for p in pages) if "The launcher sets " in text]
    claim = readme[readme.index("The launcher sets "):readme.index("Without the launcher:")]
    claimed = re.findall(r"`(--\w+)(?: ([^`\s]+))?`", claim.split("(no LoRA")[0])
    launcher = (REPO_ROOT / "exp/custom_exp/train_exo.sh").read_text()
    passed = dict(re.findall(r"^\s+(--\w+)(?: (\S+))? \\$", launcher, re.M))
    assert len(claimed) >= 10
    for flag, value in claimed:
        assert flag in passed and passed[flag] == value, (flag, value, passed.get(flag))
    assert "--lora_dim" not in passed  # the docs say it trains the full model
    # every default the launcher passes is stated
    assert {flag for flag, value in passed.items() if not value.startswith('"')} == {flag for flag, _ in claimed}
