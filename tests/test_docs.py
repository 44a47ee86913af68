"""The documentation a user reads (README.md, the docs/ pages it links, every other .md) points
only at things inside the repository: its links resolve, and the scripts, files and code names
its commands and code map name exist."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the repository's own pages: not hidden directories (.git, .pytest_cache, .venv-vllm), run outputs or build info
MARKDOWN = sorted(p for p in REPO.rglob("*.md")
                  if not any(part.startswith(".") or part == "results" or part.endswith(".egg-info")
                             for part in p.relative_to(REPO).parts))
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))  # the pages the front page links to
FRONT = [README, *DOCS]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def relative_links(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not ours to check
            yield target


def test_there_is_documentation():
    assert README in MARKDOWN and DOCS and set(DOCS) <= set(MARKDOWN)


def test_every_docs_page_is_reached_from_the_front_page():
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in relative_links(README)}
    assert not [p.name for p in DOCS if p.resolve() not in linked], "docs pages the README does not link"


# A repository path a command or the text names: a script, a test, a CI step, a page. Paths with
# a placeholder or a wildcard (src/<stage>.py, exp/*_exp/, exp/{imdb,tldr}_exp/) are patterns.
REPO_PATH = re.compile(r"(?<![\w./$-])((?:src|exp|tests|docs|\.ci)/[\w./-]*[\w])")


def named_paths(path):
    text = path.read_text(encoding="utf-8")
    for match in REPO_PATH.finditer(text):
        if text[match.end(1):match.end(1) + 1] not in ("<", "*", "{"):
            yield match.group(1)


@pytest.mark.parametrize("path", FRONT, ids=lambda p: str(p.relative_to(REPO)))
def test_every_named_repository_path_exists(path):
    """`python src/train_exo.py ...`, `bash exp/frontier/run.sh`, `tests/test_loss.py`, the code map."""
    missing = sorted({name for name in named_paths(path) if not (REPO / name).exists()})
    assert not missing, f"{path.relative_to(REPO)} names paths that do not exist: {missing}"


CODE_MAP = re.compile(r"<!-- code map: start -->(.*?)<!-- code map: end -->", re.S)


def test_the_code_map_names_code_that_exists():
    """Each step of the README's code map, `src/FILE.py` `name`, names a function, class or
    constant defined in that file (update the map when code moves)."""
    block = CODE_MAP.search(README.read_text(encoding="utf-8"))
    assert block, "README.md: no <!-- code map: start --> ... <!-- code map: end --> block"
    pairs = re.findall(r"`(src/[\w/]+\.py)` `(\w+)`", block.group(1))
    assert len(pairs) >= 8, pairs
    missing = [f"{file} {name}" for file, name in pairs
               if not re.search(rf"^\s*(?:def|class) {name}\b|^{name} = ", (REPO / file).read_text(encoding="utf-8"), re.M)]
    assert not missing, f"the code map names what its file does not define: {missing}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif REPO not in linked.parents and linked != REPO:
            broken.append(f"{target}: outside the repository")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{path.relative_to(REPO)}: " + "; ".join(broken)


def test_no_reference_to_the_design_notes_outside_the_repo():
    """The original design notes live beside the repository, where no user has them."""
    for path in [*MARKDOWN, *REPO.glob("src/**/*.py"), *REPO.glob("exp/**/*.py"), *REPO.glob("exp/**/*.sh")]:
        assert "DESIGN.md" not in path.read_text(encoding="utf-8"), path
