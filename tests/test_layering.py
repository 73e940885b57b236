"""The package's layering, held by tools rather than memory: import-linter's contracts (pyproject.toml) and the
rule that only qconv.io reads or writes model files."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILE_CALLS = {"load", "load_model", "save", "save_model", "load_external_data_for_model", "convert_model_to_external_data"}


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "lint-imports is missing: it comes with the test extras (pip install -e '.[test]')"
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "BROKEN" not in r.stdout and r.stdout.count("KEPT") >= 7
    assert "the layers: each imports only from the ones below it KEPT" in r.stdout  # exhaustive: every module has a layer


def test_only_io_touches_model_files():
    offenders = []
    for path in sorted((ROOT / "qconv").rglob("*.py")):
        if path.name == "io.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MODEL_FILE_CALLS:
                base = node.func.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id == "onnx":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} onnx...{node.func.attr}")
    assert not offenders, offenders
