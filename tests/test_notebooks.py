"""The notebooks in `notebooks/` run top to bottom, headless, on CPU, and are committed executed.

Every notebook checks its explanations with asserts against the real modules (a step-by-step
computation must equal the module's output, a decode step must equal a full forward, ...), so a
code change that makes an explanation wrong fails here. Run one with
`python -m pytest tests/test_notebooks.py -k gemma`.

After editing a notebook, re-execute it and save it with its outputs (the committed copies are
meant to be read without running them), with nbclient's command line:

    jupyter execute --inplace notebooks/NAME.ipynb
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {
    "siglip_explanation.ipynb",
    "gemma_explanation.ipynb",
    "paligemma_explanation.ipynb",
    "export_and_quantization.ipynb",
}
CELL_TIMEOUT_S = 300


def test_notebooks_present():
    missing = EXPECTED - {p.name for p in NOTEBOOKS}
    assert not missing, f"missing from {NOTEBOOK_DIR}: {sorted(missing)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_committed_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name} is not saved as one top-to-bottom run (execution counts {counts}); re-execute it and save the outputs")
    errors = [o.get("ename") for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name} was saved with errors: {errors}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the kernel inherits the environment: CPU only
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError (with the cell and its traceback) on any error
