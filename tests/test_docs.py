"""What the documents claim about the tree holds: every file they name exists, every module or
object they name in code spans imports, both data-flow diagrams show every registered task, the docs
index lists every page, and
docs/export.md lists the importer's prefixes as the code tries them."""

from __future__ import annotations

import importlib
import re

import pytest

from tests.helpers import ROOT
from transfer.backbone import PREFIXES
from transfer.tasks import TASKS

DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
FILE = re.compile(
    r"(?<![\w./-])((?:common|pretrain|transfer|slurm|configs|bench|tests|scripts|docs)/"
    r"[\w./{},*<>-]*\.(?:py|yaml|md|txt|sh|toml|json))"
)
DOTTED = re.compile(r"`((?:common|pretrain|transfer|slurm)(?:\.\w+)+)")


def expand(path: str) -> list[str]:
    """pretrain/{a,b}.py -> pretrain/a.py, pretrain/b.py."""
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [
        p
        for part in match[1].split(",")
        for p in expand(path[: match.start()] + part.strip() + path[match.end() :])
    ]


def named_files(text: str) -> set[str]:
    return {p for found in FILE.findall(text) for p in expand(found) if "<" not in p}


@pytest.mark.parametrize("document", DOCUMENTS, ids=[d.name for d in DOCUMENTS])
def test_every_file_a_document_names_exists(document):
    missing = sorted(
        p
        for p in named_files(document.read_text())
        if not list(ROOT.glob(p)) and not list(ROOT.glob(p.replace("*", "**/*")))
    )
    assert not missing, f"{document.name} names files that do not exist: {missing}"


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                target = getattr(target, name)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("document", DOCUMENTS, ids=[d.name for d in DOCUMENTS])
def test_every_module_and_object_a_document_names_in_code_exists(document):
    names = sorted(set(DOTTED.findall(document.read_text())))
    missing = [name for name in names if not resolves(name)]
    assert not missing, f"{document.name} names modules or objects that do not exist: {missing}"


def test_the_helpers_see_what_they_claim_to():
    assert expand("pretrain/{a,b}.py") == ["pretrain/a.py", "pretrain/b.py"]
    assert named_files(
        "see `transfer/tasks/{linear,knn}.py` and configs/pipeline/demo.yaml; runs/x.yaml"
    ) == {"transfer/tasks/linear.py", "transfer/tasks/knn.py", "configs/pipeline/demo.yaml"}
    assert resolves("common.seeds.derive_seed") and not resolves("common.seeds.no_such_thing")


def diagram(text: str, heading: str) -> str:
    section = text.split(heading, 1)[1]
    return section.split("```", 2)[1]


def test_both_data_flow_diagrams_show_every_registered_task():

    for document, heading in (
        (ROOT / "docs" / "design.md", "## Data flow"),
        (ROOT / "README.md", "## Architecture"),
    ):
        shown = diagram(document.read_text(), heading)
        absent = [name for name in TASKS if name not in shown]
        assert not absent, f"{document.name}'s diagram omits the tasks {absent}"
        for step in ("supervised", "export", "report"):
            assert step in shown, f"{document.name}'s diagram omits {step}"


def test_the_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md")
    assert [page for page in pages if f"]({page})" not in index] == []


def test_export_md_lists_the_prefixes_the_importer_tries_in_its_order():

    text = (ROOT / "docs" / "export.md").read_text()
    step = text.split("**Strip a prefix.**", 1)[1].split("After stripping", 1)[0]
    assert re.findall(r"`([^`]*)`", step) == ['""' if p == "" else p for p in PREFIXES]
