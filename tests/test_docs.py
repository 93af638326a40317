"""README.md and docs/*.md stand alone: every repository path they name exists, and they speak of
hardware as a user has it (no project issue numbers, no "GPU machine", no development hand-carry
folders)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FOLDERS = ("scripts", "benchmarks", "docs", "tests", "vortex_hybrid", "cpu_kernels", "gpu_kernels",
           "scheduler", "predictors", ".ci")
PATH = re.compile(r"(?<![\w./~-])((?:%s)/[\w./*-]*)" % "|".join(re.escape(f) for f in FOLDERS))


def named_paths(text: str) -> list[str]:
    """Repository paths a document names (`scripts/gpu_check.sh`, `docs/`, `tests/test_*.py`),
    trailing punctuation dropped."""
    return sorted({m.group(1).rstrip(".,:;") for m in PATH.finditer(text)})


def test_named_paths_are_found_in_text():
    text = ("See [docs/runtime.md](docs/runtime.md), `scripts/gpu_check.sh`; tests/test_*.py and "
            "vortex_hybrid/eval/. Not ~/.cache/docs/x, a/docs/y, or docs_z/q.")
    assert named_paths(text) == ["docs/runtime.md", "scripts/gpu_check.sh", "tests/test_*.py",
                                 "vortex_hybrid/eval/"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_repository_path_a_doc_names_exists(doc):
    missing = [p for p in named_paths(doc.read_text())
               if not (any(ROOT.glob(p)) if "*" in p else (ROOT / p).exists())]
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docs_speak_of_hardware_as_users_have_it(doc):
    bad = re.compile(r"\bissues?\s*#?\d+|\bGPU machine|\.carry\b|\.overlay\b|\.whl/", re.I)
    hits = [f"{doc.name}:{i}: {m.group(0)!r}" for i, line in enumerate(doc.read_text().splitlines(), 1)
            for m in bad.finditer(line)]
    assert not hits, hits
