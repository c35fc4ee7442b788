"""What happens when things go wrong (docs/faults.md): each way a run, a result or a CSV could be
lost, and what the program does instead. One tiny training run (module fixture) serves them all;
CPU only."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

import evaluation
import inference
import main_retrieval
import model
import predict
import preprocessing
import runs
import training
import utils
from dataset import MammogramDataset, read_split_csv
from imaging import DatasetError, read_pixels
from main_retrieval import DESCRIPTION_FILES
from preemption import EXIT_PREEMPTED, PreemptionWatch
from synthetic import write_dicom
from tests.conftest import SIZE, mammogram, tiny_run_args
from utils import CheckpointError, DiskFullError, UsageError, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
LOG_VALUES = ["epoch", "lr", "train_loss", "val_loss", "dice_benign", "dice_mass", "dice_calc",
              "mean_fg_dice"]  # log.csv without the timings


def fast_args(csv: Path, folder: Path, cache: Path, *extra: str) -> list[str]:
    """The tiny run with a 16-channel decoder: two steps an epoch on the small CSVs."""
    return tiny_run_args(csv, folder, cache, "--decoder-channels", "16", *extra)


def copy_csvs(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in ("train.csv", "val.csv", "test.csv", "dataset.json"):
        shutil.copy(source / name, target / name)
    return target


def clone_run(source: Path, target: Path) -> Path:
    """A copy of a run folder: checkpoints hard-linked (they are only ever replaced, never
    written in place), log.csv copied (it is appended to)."""
    target.mkdir()
    for file in source.iterdir():
        (os.link if file.suffix == ".pth" else shutil.copy2)(file, target / file.name)
    return target


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.split("\r")[-1]  # after any progress bar
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def small_csv(csv_dir, tmp_path_factory) -> Path:
    """The session's CSVs cut to 8 training and 2 validation mammograms (whole mammograms)."""
    out = copy_csvs(csv_dir, tmp_path_factory.mktemp("small_csv"))
    for split, keep in (("train", 8), ("val", 2)):
        rows = pd.read_csv(out / f"{split}.csv", dtype=str)
        kept = rows["img_path"].drop_duplicates().iloc[:keep]
        rows[rows["img_path"].isin(kept)].to_csv(out / f"{split}.csv", index=False)
    return out


@pytest.fixture(scope="module")
def run(small_csv, tmp_path_factory) -> SimpleNamespace:
    """A straight two-epoch run, and a copy of its folder as it was after epoch 1. A killed
    write's temporary file waits in its folder before it starts, and the order of buffer
    broadcasts and validations is recorded."""
    base = tmp_path_factory.mktemp("faults")
    folder, after_epoch_1 = base / "run-a", base / "after-epoch-1"
    folder.mkdir()
    stale = folder / ".last.pth.k1ll3d_x.tmp"
    stale.write_bytes(b"half a checkpoint")
    calls = []
    real_broadcast, real_validate = training.broadcast_buffers, training.validate
    real_save = training.save_checkpoint

    def save(state, path):
        real_save(state, path)
        if path.name == "best.pth" and state["epoch"] == 0:  # epoch 1's last write
            clone_run(folder, after_epoch_1)

    def broadcast(*args, **kwargs):
        calls.append("broadcast")
        return real_broadcast(*args, **kwargs)

    def validate(*args, **kwargs):
        calls.append("validate")
        return real_validate(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "broadcast_buffers", broadcast)
        patch.setattr(training, "validate", validate)
        patch.setattr(training, "save_checkpoint", save)
        assert training.main(fast_args(small_csv, folder, base / "cache", "--epochs", "2")) == 0
    return SimpleNamespace(base=base, folder=folder, cache=base / "cache", csv=small_csv,
                           stale=stale, calls=calls, after_epoch_1=after_epoch_1)


def resumed(argv: list[str]):
    """(args, checkpoint) as train() has them after --resume merged the saved flags."""
    return runs.resolve_resume(*runs.parse_args(argv))


def no_long_work(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the cache build started before the flags were checked")

    monkeypatch.setattr(training, "load_datasets", fail)


# ----------------------------------------------------------------------------- run folders


def test_a_finished_runs_folder_is_never_written_without_resume(run, capsys, monkeypatch):
    def state() -> dict:
        return {name: (run.folder / name).stat().st_mtime_ns for name in runs.RUN_FILES}

    before = state()
    no_long_work(monkeypatch)
    again = fast_args(run.csv, run.folder, run.cache, "--epochs", "2")
    assert training.main(again) == 2
    err = one_line_error(capsys)
    assert "--resume" in err and "--overwrite" in err and str(run.folder) in err
    # --epochs 0 is refused before anything is deleted, even with --overwrite.
    assert training.main([*again, "--epochs", "0", "--overwrite"]) == 2
    assert "--epochs" in one_line_error(capsys)
    assert state() == before

    # --overwrite replaces the run: its files go when the new one starts.
    copy = clone_run(run.folder, run.base / "overwritten")
    args, _ = runs.parse_args(fast_args(run.csv, copy, run.cache, "--overwrite"))
    runs.validate_args(args)
    runs.prepare_run_folder(args)
    assert not any((copy / name).exists() for name in runs.RUN_FILES)


def test_resume_path_continues_in_its_own_folder(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "checkpoint"  # the default --checkpoint-dir, holding another run
    other.mkdir()
    (other / "log.csv").write_text("epoch\n1\n")
    args, checkpoint = resumed(["--resume", str(run.folder / "last.pth"), "--epochs", "3"])
    assert args.checkpoint_dir == run.folder
    runs.validate_args(args, checkpoint)
    args, checkpoint = resumed(["--resume", str(run.folder / "last.pth"), "--epochs", "3",
                                "--checkpoint-dir", "checkpoint"])
    with pytest.raises(UsageError, match="holds another run.*leave --checkpoint-dir out"):
        runs.validate_args(args, checkpoint)


BAD_FLAGS = [
    (("--lr", "-1"), "--lr"), (("--lr", "nan"), "--lr"), (("--lr", "inf"), "--lr"),
    (("--workers", "-1"), "--workers"),
    (("--pretrained", "BOGUS"), "--pretrained 'BOGUS' is neither a file"),
    (("--size", "0", "0"), "--size"), (("--size", "1", "1"), "--size"),
    (("--epochs", "0"), "--epochs"), (("--epochs", "-1"), "--epochs"),
    (("--batch-size", "1"), "--batch-size"), (("--weight-decay", "inf"), "--weight-decay"),
    (("--clip-grad-norm", "-1"), "--clip-grad-norm"), (("--min-lr-ratio", "2"), "--min-lr-ratio"),
    (("--patch-size", "16", "16"), "--patch-size"),
    (("--patch-size", "64", "64", "--scale", "0"), "--scale"),
    (("--patch-size", "64", "64", "--sw-overlap", "1"), "--sw-overlap"),
]


def test_every_flag_and_folder_is_checked_before_the_cache_build(run, tmp_path, capsys,
                                                                 monkeypatch):
    def check(*extra: str, folder: Path = tmp_path / "new", cache: Path = run.cache) -> None:
        args, _ = runs.parse_args(fast_args(run.csv, folder, cache, *extra))
        runs.validate_args(args)

    for extra, named in BAD_FLAGS:
        with pytest.raises(UsageError, match=named):
            check(*extra)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UsageError, match="--checkpoint-dir .* is a file"):
        check(folder=blocker / "missing_parent" / "run")
    with pytest.raises(UsageError, match="--pretrained .*cannot be loaded"):
        check("--pretrained", str(blocker))  # an empty file: not a state dict

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_probe = utils.tempfile.TemporaryFile

    def probe(*args, dir=None, **kwargs):  # root ignores chmod: a read-only mount instead
        if Path(dir) == read_only:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_probe(*args, dir=dir, **kwargs)

    monkeypatch.setattr(utils.tempfile, "TemporaryFile", probe)
    with pytest.raises(UsageError, match="cannot write to --cache-dir .*Read-only file system"):
        check(cache=read_only / "cache")

    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: real_usage(path)._replace(free=10_000_000))
    with pytest.raises(UsageError, match="not enough free space for --checkpoint-dir"):
        check()  # resnet18's three checkpoints are ~0.5 GB, the cache here ~0.1 MB
    monkeypatch.undo()

    # From the command line: exit code 2, one line, before any long work.
    no_long_work(monkeypatch)
    assert training.main(fast_args(run.csv, tmp_path / "new", run.cache, "--lr", "nan")) == 2
    assert "--lr" in one_line_error(capsys)


def test_resume_refuses_changed_train_val_rows(run, tmp_path):
    data = load_checkpoint(run.folder / "last.pth")["data"]
    assert data["csv_dir"] == str(run.csv.resolve())
    assert data["cache_dir"] == str(run.cache.resolve())
    assert Path(data["data_root"]).is_dir()
    assert data["rows"] == {s: len(pd.read_csv(run.csv / f"{s}.csv")) for s in ("train", "val")}
    changed = copy_csvs(run.csv, tmp_path / "csv")  # retrieval re-run with one patient fewer
    rows = pd.read_csv(changed / "train.csv", dtype=str)
    rows[rows["patient_id"] != rows["patient_id"].iloc[-1]].to_csv(changed / "train.csv",
                                                                   index=False)
    argv = ["--resume", str(run.folder / "last.pth"), "--epochs", "3", "--csv-dir", str(changed)]
    with pytest.raises(UsageError, match="differ from the ones this run started on.*"
                                         "--allow-changed-data"):
        runs.validate_args(*resumed(argv))
    runs.validate_args(*resumed([*argv, "--allow-changed-data"]))

    moved = tmp_path / "moved"  # another data root: holds the first image only
    first = read_split_csv(run.csv / "train.csv")[0]["img_path"].iloc[0]
    (moved / first).parent.mkdir(parents=True)
    shutil.copy(Path(data["data_root"]) / first, moved / first)
    argv = ["--resume", str(run.folder / "last.pth"), "--epochs", "3", "--data-root", str(moved)]
    with pytest.raises(UsageError, match="read its images from .*--allow-changed-data"):
        runs.validate_args(*resumed(argv))


def test_resume_reuses_the_runs_cache(run, tmp_path, monkeypatch):
    saved = load_checkpoint(run.folder / "last.pth")
    # A run started in another folder with relative paths (--cache-dir cache --csv-dir csv).
    elsewhere = {"model": {}, "config": saved["config"], "data": saved["data"],
                 "args": {**saved["args"], "cache_dir": "cache", "csv_dir": "csv"}}
    torch.save(elsewhere, tmp_path / "last.pth")
    monkeypatch.chdir(tmp_path)
    args, _ = resumed(["--resume", str(tmp_path / "last.pth")])
    assert args.cache_dir == run.cache.resolve() and args.csv_dir == run.csv.resolve()
    args, _ = resumed(["--resume", str(tmp_path / "last.pth"), "--cache-dir", "elsewhere"])
    assert args.cache_dir == Path("elsewhere")  # given: this machine's cache


# ----------------------------------------------------------------------------- retrieval


def description_copy(synthetic_root: Path, target: Path, renamed_copies: int,
                     keep_original: bool) -> Path:
    """The synthetic description CSVs, plus (or replaced by) copies whose folders don't exist."""
    target.mkdir()
    for name in DESCRIPTION_FILES.values():
        text = (synthetic_root / name).read_text()
        header, body = text.split("\n", 1)
        parts = [body] if keep_original else []
        parts += [body.replace("_P_0", f"_P_{9 - k}") for k in range(renamed_copies)]
        (target / name).write_text(header + "\n" + "".join(parts))
    return target


def test_retrieval_never_replaces_csvs_with_nothing(synthetic_root, csv_dir, tmp_path,
                                                    capsys):
    out = copy_csvs(csv_dir, tmp_path / "csv")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    wrong = description_copy(synthetic_root, tmp_path / "wrong", 1, keep_original=False)
    argv = ["--data-root", str(synthetic_root), "--out-dir", str(out)]
    assert main_retrieval.main([*argv, "--metadata-dir", str(wrong)]) != 0
    err = one_line_error(capsys)
    assert "kept 0 of" in err and "missing or unreadable full mammogram" in err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before

    mostly = description_copy(synthetic_root, tmp_path / "mostly", 2, keep_original=True)
    assert main_retrieval.main([*argv, "--metadata-dir", str(mostly)]) == 0
    err = capsys.readouterr().err
    assert "WARNING: kept only" in err and "top reasons: missing or unreadable full" in err


def test_truncated_or_pixelless_dicom_is_skipped_at_retrieval(synthetic_root, csv_dir,
                                                              tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "CBIS-DDSM", root / "CBIS-DDSM")
    for name in DESCRIPTION_FILES.values():
        shutil.copy(synthetic_root / name, root / name)
    rows = pd.read_csv(csv_dir / "train.csv")
    truncated = rows["img_path"].iloc[0]
    # A mask its header names (one without is typed by decoding it, and fails as unreadable).
    pixelless = next(p for p in rows["roi_path"].iloc[::-1]
                     if "SeriesDescription" in pydicom.dcmread(root / p))
    (root / truncated).write_bytes((root / truncated).read_bytes()[:-1000])
    header = pydicom.dcmread(root / pixelless)
    del header.PixelData
    header.save_as(root / pixelless)

    out = tmp_path / "csv"
    assert main_retrieval.main(["--data-root", str(root), "--out-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    report = json.loads((out / "retrieval_report.json").read_text())
    problems = {s["file"]: s["problem"] for s in report["skipped"] if "problem" in s}
    assert problems[truncated].startswith("pixel data truncated")
    assert problems[pixelless] == "no pixel data"
    for path in problems:
        assert f"damaged DICOM: {path}" in stdout
    written = pd.concat(pd.read_csv(out / f"{s}.csv") for s in ("train", "val", "test"))
    assert not set(problems) & (set(written["img_path"]) | set(written["roi_path"]))


def test_a_full_disk_is_reported_as_such(csv_dir, synthetic_root, tmp_path, capsys,
                                         monkeypatch):
    def no_space(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=f"no space left on device .*{tmp_path}.* free"):
        utils.atomic_write(tmp_path / "a.csv", no_space)

    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=0))

    def torch_save_on_full_disk(obj, f, *args, **kwargs):  # torch hides the errno
        Path(f).write_bytes(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 184320 "
                           "vs 104384")

    monkeypatch.setattr(torch, "save", torch_save_on_full_disk)
    with pytest.raises(DiskFullError, match="no space left on device .*has 0 B free"):
        utils.save_checkpoint({"model": {}}, tmp_path / "run" / "last.pth")
    assert os.listdir(tmp_path / "run") == []  # no half file, no temporary file
    monkeypatch.undo()

    # Retrieval on a full disk: one line, and the CSVs already there stay a consistent set.
    out = copy_csvs(csv_dir, tmp_path / "csv")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    real_write = Path.write_text
    written = []

    def second_write_fails(self, *args, **kwargs):
        written.append(self)
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", second_write_fails)
    assert main_retrieval.main(["--data-root", str(synthetic_root), "--out-dir", str(out)]) == 1
    monkeypatch.undo()
    assert "no space left on device" in one_line_error(capsys)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_a_moved_data_root_points_at_data_root(small_csv, tmp_path):
    moved = copy_csvs(small_csv, tmp_path / "csv")
    sidecar = json.loads((moved / "dataset.json").read_text())
    (moved / "dataset.json").write_text(json.dumps({**sidecar, "data_root": str(tmp_path / "x")}))
    args, _ = runs.parse_args(fast_args(moved, tmp_path / "run", tmp_path / "cache"))
    with pytest.raises(UsageError, match="is missing: if the data moved.*pass --data-root"):
        runs.validate_args(args)
    with pytest.raises(DatasetError, match="no file .*pass --data-root"):
        read_pixels(tmp_path / "x" / "1-1.dcm")


# ----------------------------------------------------------------------------- results


def test_evaluation_results_per_run_without_stale_outputs(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results" / run.folder.name / "best"  # results/<run folder>/<stem>
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "old_case.png").write_bytes(b"stale")
    (out / "metrics.json").write_text("{}")
    argv = ["--checkpoint", str(run.folder / "best.pth"), "--csv", str(run.csv / "val.csv"),
            "--cache-dir", str(run.cache), "--workers", "0", "--bootstrap", "10",
            "--overlays", "1", "--no-progress"]
    assert evaluation.main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["n_images"] == 2
    assert not (out / "overlays" / "old_case.png").exists()
    assert len(list((out / "overlays").iterdir())) == 1

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a result")
    with pytest.raises(UsageError, match="notes.txt, which is not a result"):
        evaluation.prepare_results_folder(mine)


def test_predict_writes_an_images_outputs_as_a_set(run, tmp_path, monkeypatch):
    image = tmp_path / "in" / "scan.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), mammogram(96, 64, chest_wall_right=False))
    members = inference.load_ensemble([run.folder / "best.pth"], torch.device("cpu"))
    out = tmp_path / "out"
    real_write = Path.write_bytes
    writes = []

    def second_write_fails(self, data):  # the disk fills up after the mask
        writes.append(self)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", second_write_fails)
    with pytest.raises(OSError, match="no space left on device"):
        predict.predict_files([image], ["scan"], members, out, torch.device("cpu"),
                              progress=False)
    monkeypatch.undo()
    assert os.listdir(out) == []
    predict.predict_files([image], ["scan"], members, out, torch.device("cpu"),
                          progress=False)
    assert sorted(os.listdir(out)) == ["scan.json", "scan_mask.png", "scan_overlay.png"]


def test_evaluation_and_predict_end_a_full_disk_with_one_line(run, tmp_path, monkeypatch,
                                                              capsys):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    image = tmp_path / "in" / "scan.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), mammogram(1000, 600, chest_wall_right=False))  # no size warning
    argv = ["--checkpoint", str(run.folder / "best.pth"), "--csv", str(run.csv / "val.csv"),
            "--cache-dir", str(run.cache), "--workers", "0", "--bootstrap", "10",
            "--overlays", "0", "--no-progress", "--out", str(tmp_path / "results")]
    monkeypatch.setattr(pd.DataFrame, "to_csv", full)  # per_image.csv
    assert evaluation.main(argv) == 1
    assert "no space left on device" in one_line_error(capsys)
    assert not (tmp_path / "results" / "metrics.json").exists()
    monkeypatch.setattr(Path, "write_bytes", full)  # the first output of the image
    assert predict.main(["--checkpoint", str(run.folder / "best.pth"), "--out",
                         str(tmp_path / "out"), "--no-progress", str(image)]) == 1
    assert "no space left on device" in one_line_error(capsys)


# ----------------------------------------------------------------------------- files


def test_written_files_follow_the_umask(run, tmp_path):
    for mask in (0o022, 0o027):
        old = os.umask(mask)
        try:
            utils.atomic_write(tmp_path / f"{mask:o}.json", lambda t: Path(t).write_text("{}"))
        finally:
            os.umask(old)
        assert (tmp_path / f"{mask:o}.json").stat().st_mode & 0o777 == 0o666 & ~mask
    expected = 0o666 & ~utils.current_umask()
    for name in runs.RUN_FILES:
        assert (run.folder / name).stat().st_mode & 0o777 == expected, name


def test_temporary_files_of_killed_writes_are_cleaned(run, csv_dir, synthetic_root, tmp_path):
    assert not run.stale.exists()  # the run removed it from its folder
    out = copy_csvs(csv_dir, tmp_path / "csv")
    stale, unrelated = out / ".train.csv.a1b2c3d4.tmp", out / ".notes.tmp"
    stale.write_text("half")
    unrelated.write_text("someone else's")
    assert main_retrieval.main(["--data-root", str(synthetic_root), "--out-dir", str(out)]) == 0
    assert not stale.exists() and unrelated.exists()
    assert (out / "train.csv").stat().st_mode & 0o777 == 0o666 & ~utils.current_umask()
    fresh = out / ".val.csv.e5f6g7h8.tmp"  # another process may be writing it right now
    fresh.write_text("being written")
    assert utils.clean_stale_tmp(out) == [] and fresh.exists()


def test_ddp_validates_the_model_rank0_saves(run):
    # Rank 0's buffers (BatchNorm statistics) reach every rank before each validation;
    # tests/test_training.py checks the numbers under torchrun.
    assert run.calls == ["broadcast", "validate"] * 2


# ----------------------------------------------------------------------------- kills

KILL_IN_EPOCH_2 = """
import os, signal, sys
import training
real, calls = training.augment_batch, []
def augment(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # step 2 of epoch 2: one step done, in memory only
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
training.augment_batch = augment
sys.exit(training.main(sys.argv[1:]))
"""
KILL_IN_CHECKPOINT_WRITE = """
import io, os, signal, sys
import torch, training
real = torch.save
def save(obj, f, *args, **kwargs):  # half the bytes reach the disk, then the OOM killer
    buffer = io.BytesIO()
    real(obj, buffer, *args, **kwargs)
    with open(f, "wb") as out:
        out.write(buffer.getvalue()[: buffer.tell() // 2])
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
sys.exit(training.main(sys.argv[1:]))
"""


def test_sigkill_in_an_epoch_and_in_a_checkpoint_write_then_resume_gives_the_same_run(run):
    folder = clone_run(run.after_epoch_1, run.base / "killed")
    last = folder / "last.pth"
    # --resume alone: the run's folder, cache, CSVs and flags come from the checkpoint.
    resume = ["--resume", str(last), "--workers", "0", "--no-progress"]
    assert subprocess.run([sys.executable, "-c", KILL_IN_EPOCH_2, *resume], cwd=REPO,
                          capture_output=True).returncode == -signal.SIGKILL
    assert load_checkpoint(last)["epoch"] == 0
    assert pd.read_csv(folder / "log.csv")["epoch"].tolist() == [1]

    assert subprocess.run([sys.executable, "-c", KILL_IN_CHECKPOINT_WRITE, *resume], cwd=REPO,
                          capture_output=True).returncode == -signal.SIGKILL
    assert load_checkpoint(last)["epoch"] == 0  # the half-written epoch 2 never replaced it
    assert list(folder.glob(".last.pth.*.tmp"))
    assert pd.read_csv(folder / "log.csv")["epoch"].tolist() == [1, 2]

    assert training.main(resume) == 0
    straight, again = load_checkpoint(run.folder / "last.pth"), load_checkpoint(last)
    assert again["epoch"] == straight["epoch"] == 1
    for key, tensor in straight["model"].items():
        assert torch.equal(tensor, again["model"][key]), key
    pd.testing.assert_frame_equal(pd.read_csv(folder / "log.csv")[LOG_VALUES],
                                  pd.read_csv(run.folder / "log.csv")[LOG_VALUES])
    assert not list(folder.glob(".*.tmp"))


SIGNAL_IN_STEP = """
import os, signal, sys
import training
real, calls = training.augment_batch, []
def augment(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(os.environ["PREEMPT_STEP"]):  # the warning lands during this step
        os.kill(os.getpid(), getattr(signal, os.environ["PREEMPT_SIGNAL"]))
    return real(*args, **kwargs)
training.augment_batch = augment
sys.exit(training.main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("signal_name", "step"), [("SIGTERM", 1), ("SIGUSR1", 2)])
def test_a_preemption_signal_stops_after_the_step_and_resume_gives_the_same_run(run,
                                                                               signal_name,
                                                                               step):
    # Epoch 2 of 2 steps: stopped mid-epoch, or at its last step (the resume only validates).
    folder = clone_run(run.after_epoch_1, run.base / f"preempted-{signal_name}")
    last = folder / "last.pth"
    resume = ["--resume", str(last), "--workers", "0", "--no-progress"]
    stopped = subprocess.run([sys.executable, "-c", SIGNAL_IN_STEP, *resume], cwd=REPO,
                             capture_output=True, text=True,
                             env={**os.environ, "PREEMPT_SIGNAL": signal_name,
                                  "PREEMPT_STEP": str(step)})
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr
    assert f"preempted: {signal_name} in epoch 2, after step {step}" in stopped.stderr
    checkpoint = load_checkpoint(last)
    assert checkpoint["epoch"] == 0 and checkpoint["partial_epoch"]["step"] == step
    assert pd.read_csv(folder / "log.csv")["epoch"].tolist() == [1]
    # The rest of the epoch must be the same steps: another batch size is refused up front.
    with pytest.raises(UsageError, match="stopped mid-epoch at --batch-size 4"):
        runs.validate_args(*resumed([*resume, "--batch-size", "2"]))

    assert training.main(resume) == 0  # step 2 of epoch 2, validation, the epoch's checkpoint
    straight, again = load_checkpoint(run.folder / "last.pth"), load_checkpoint(last)
    assert again["epoch"] == straight["epoch"] == 1 and "partial_epoch" not in again
    for key, tensor in straight["model"].items():
        assert torch.equal(tensor, again["model"][key]), key
    pd.testing.assert_frame_equal(pd.read_csv(folder / "log.csv")[LOG_VALUES],
                                  pd.read_csv(run.folder / "log.csv")[LOG_VALUES])


def test_the_watch_turns_preemption_signals_into_a_flag():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionWatch() as watch:
        assert not watch.requested(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.requested(torch.device("cpu")) and watch.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before  # restored on the way out


# ----------------------------------------------------------------------------- exit codes


def test_exit_code_2_for_a_usage_error_and_1_for_a_failure_during_the_work(run, tmp_path,
                                                                          capsys):
    # A damaged mammogram is found while the cache is built: after the flags were checked.
    rows, root = read_split_csv(run.csv / "train.csv")
    data = tmp_path / "data"
    for relative in {*rows["img_path"], *rows["roi_path"]}:
        (data / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / relative, data / relative)
    (data / rows["img_path"].iloc[-1]).write_bytes(b"not a DICOM any more")
    damaged = ["--data-root", str(data), "--cache-dir", str(tmp_path / "cache")]
    assert training.main([*fast_args(run.csv, tmp_path / "run", run.cache), *damaged]) == 1
    assert "cannot read DICOM" in one_line_error(capsys)
    evaluate = ["--checkpoint", str(run.folder / "best.pth"), "--workers", "0",
                "--bootstrap", "5", "--no-progress", "--out", str(tmp_path / "results")]
    assert evaluation.main([*evaluate, "--csv", str(run.csv / "train.csv"), *damaged]) == 1
    assert "cannot read DICOM" in one_line_error(capsys)
    assert evaluation.main([*evaluate, "--csv", str(tmp_path / "no" / "test.csv")]) == 2
    assert "--csv: no CSV at" in one_line_error(capsys)
    if not torch.cuda.is_available():
        assert predict.main(["--checkpoint", str(run.folder / "best.pth"), "--device", "cuda",
                             str(data)]) == 2
        assert "--device cuda asked for" in one_line_error(capsys)


# ----------------------------------------------------------------------------- damaged inputs


def test_damaged_or_missing_dicoms_are_named(tmp_path):
    pixels = (np.arange(40 * 30) * 50).astype(np.uint16).reshape(40, 30)
    write_dicom(tmp_path / "ok.dcm", pixels, patient_id="x", series_description="full")
    data = (tmp_path / "ok.dcm").read_bytes()
    (tmp_path / "corrupt.dcm").write_bytes(b"not a dicom at all")
    (tmp_path / "truncated.dcm").write_bytes(data[:-500])
    header = pydicom.dcmread(tmp_path / "ok.dcm")
    del header.PixelData
    header.save_as(tmp_path / "pixelless.dcm")
    for name in ("corrupt.dcm", "truncated.dcm", "pixelless.dcm", "missing.dcm"):
        with pytest.raises(DatasetError, match=name):
            read_pixels(tmp_path / name)
    no_mask = preprocessing.Mammogram("ok.dcm", ("missing_mask.dcm",), (1,), "P_1", "Mass-Test")
    with pytest.raises(DatasetError, match="missing_mask.dcm"):
        preprocessing.preprocess(no_mask, tmp_path, SIZE)


def test_csvs_with_bom_and_blank_lines_read_alike(csv_dir, synthetic_root, tmp_path):
    def bom_and_blank_lines(text: str) -> str:
        return "\ufeff" + text.replace("\n", "\n\n", 3)

    copy = copy_csvs(csv_dir, tmp_path / "csv")
    (copy / "val.csv").write_text(bom_and_blank_lines((csv_dir / "val.csv").read_text()))
    pd.testing.assert_frame_equal(read_split_csv(copy / "val.csv")[0],
                                  read_split_csv(csv_dir / "val.csv")[0])
    meta = tmp_path / "meta"
    meta.mkdir()
    for name in DESCRIPTION_FILES.values():
        (meta / name).write_text(bom_and_blank_lines((synthetic_root / name).read_text()))
    pd.testing.assert_frame_equal(main_retrieval.load_descriptions(meta),
                                  main_retrieval.load_descriptions(synthetic_root))


class Bomb:
    """Unpickling it runs a command: what a checkpoint from a stranger could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_bomb_is_refused_by_every_loading_path(run, tmp_path, capsys):
    marker = tmp_path / "exploded"
    bomb = tmp_path / "bomb.pth"
    torch.save({"model": Bomb(marker), "config": {}}, bomb)
    with pytest.raises(CheckpointError, match="pickled objects"):
        load_checkpoint(bomb)
    for main, argv in (
            (training.main, fast_args(run.csv, tmp_path / "r", run.cache, "--resume", str(bomb))),
            (training.main, fast_args(run.csv, tmp_path / "p", run.cache, "--pretrained",
                                      str(bomb))),
            (evaluation.main, ["--checkpoint", str(bomb), "--csv", str(run.csv / "val.csv")]),
            (predict.main, ["--checkpoint", str(bomb), str(bomb)])):
        assert main(argv) == 2
        assert "pickled objects" in one_line_error(capsys)
    with pytest.raises(pickle.UnpicklingError):
        model.build_model("resnet18", pretrained=str(bomb))

    # A cache entry replaced by a pickle.
    data = MammogramDataset.from_csv(run.csv / "val.csv", run.cache, SIZE)
    entry = data.cache.paths(data.mammograms[0])[0]
    saved = entry.read_bytes()
    try:
        np.save(entry, np.array([Bomb(marker)], dtype=object), allow_pickle=True)
        data[0]  # refused (allow_pickle=False), or rebuilt as a corrupt entry
    except ValueError as error:
        assert "allow_pickle" in str(error)
    finally:
        entry.write_bytes(saved)
    assert not marker.exists()
