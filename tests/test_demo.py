"""`make demo` twice in a row, then `make clean`: the Makefile's own commands (from make -n),
run in this process on tiny settings in a scratch folder (one epoch at 64x48)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import evaluation
import main_retrieval
import synthetic
import training
from tests.conftest import SIZE, STUDY

REPO = Path(__file__).resolve().parents[1]
MAINS = {"synthetic.py": synthetic.main, "main_retrieval.py": main_retrieval.main,
         "Train_deep_labv3+.py": training.main, "Test_deep_labV3+.py": evaluation.main}
TINY = {
    "DEMO_DATA_FLAGS": f"--patients {STUDY['patients']} --size {STUDY['size'][0]} "
                       f"{STUDY['size'][1]} --seed {STUDY['seed']} --no-progress",
    "DEMO_FLAGS": f"--backbone resnet18 --decoder-channels 16 --size {SIZE[0]} {SIZE[1]} "
                  "--epochs 1 --batch-size 4 --workers 0 --no-progress",
    "DEMO_TEST_FLAGS": "--bootstrap 5 --overlays 1 --workers 0 --no-progress",
}


def recipe(target: str, folder: Path) -> list[str]:
    """The commands `make TARGET` would run in folder (the installing step left out)."""
    variables = [f"{name}={value}" for name, value in TINY.items()]
    result = subprocess.run(["make", "-f", str(REPO / "Makefile"), "-C", str(folder), "-n",
                             "--no-print-directory", "-o", ".venv/.installed", target,
                             "PY=python", *variables], capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_twice_then_make_clean(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = [shlex.split(line) for line in recipe("demo", tmp_path)]
    assert [command[1] for command in commands] == list(MAINS)
    for _run in range(2):  # the second time finds the first one's data, CSVs, run and results
        for _, script, *argv in commands:
            assert MAINS[script](argv) == 0, shlex.join([script, *argv])
    assert (tmp_path / "results" / "demo" / "metrics.json").is_file()

    for line in recipe("clean", tmp_path):
        assert line.startswith("rm -rf ")
        subprocess.run(line, shell=True, cwd=tmp_path, check=True)
    assert not list((tmp_path / "checkpoint").iterdir())  # no run left for a new demo to meet
    assert not (tmp_path / "results").exists() and not (tmp_path / "data").exists()
