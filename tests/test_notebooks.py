"""The notebooks: committed without outputs, and they run top to bottom (nbclient).

Each notebook checks its own numbers with ``assert`` cells (a failing one fails the
test). They run in a temporary dir with ``MLPLAB_ROOT`` there, so their runs land under
``tmp_path/logs``, never in the repo.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
NAMES = [p.stem for p in NOTEBOOKS]


def test_notebooks_are_committed_without_outputs():
    assert NAMES == ["01_quick_start", "02_activations_vanishing_gradients", "03_sweep_analysis"]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        assert book.metadata.kernelspec.name == "python3", path.name
        code = [c for c in book.cells if c.cell_type == "code"]
        assert code, path.name
        for cell in code:
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs not stripped"
        assert "from mlplab import notebook as nb" in code[0].source, path.name  # uses the package


def _execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("MLPLAB_ROOT", str(tmp_path))
    monkeypatch.setenv("MLPLAB_DATA_DIR", str(tmp_path / "data"))
    book = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return book


def _pngs(book: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for c in book.cells if c.cell_type == "code" for out in c.outputs)


def _job_dirs(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob("events.out.tfevents.*")})


def test_quick_start_notebook_runs(tmp_path, monkeypatch):
    book = _execute("01_quick_start", tmp_path, monkeypatch)
    assert _pngs(book) == 3  # curves, confusion matrix + misclassified, the sample grid
    [run_dir] = _job_dirs(tmp_path)
    assert run_dir.relative_to(tmp_path / "logs").parts[0] == "notebooks"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    printed = [o.text for c in book.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stdout"]
    report = next(text for text in printed if "| macro avg |" in text)
    assert "| class | precision | recall | F1 | support |" in report


@pytest.mark.slow
def test_activations_notebook_runs(tmp_path, monkeypatch):
    book = _execute("02_activations_vanishing_gradients", tmp_path, monkeypatch)
    assert _pngs(book) == 3
    assert len(_job_dirs(tmp_path)) == 3


@pytest.mark.slow
def test_sweep_notebook_runs(tmp_path, monkeypatch):
    book = _execute("03_sweep_analysis", tmp_path, monkeypatch)
    assert _pngs(book) == 2
    jobs = _job_dirs(tmp_path)
    assert len(jobs) == 4 and all((j / "run.json").is_file() for j in jobs)
    assert all(j.relative_to(tmp_path / "logs").parts[0] == "multiruns" for j in jobs)
