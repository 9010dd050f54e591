"""Bad input to every script: arguments, output roots, dataset files, and the weights, configuration and
checkpoint files of an earlier run. Each must stop with one error line on stderr that names the problem and
the fix, exit 2 for a usage error and 1 otherwise, print no traceback, and change no existing result file.

Most cases run in process through the scripts' own `main` (their `__main__` blocks only call it, through
gsm.experiments.cli.run_main for the experiment scripts); a few run as real processes to check the same end to end."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import dataset
import gsm.experiments.lottery
import gsm.experiments.rc56
from base_model import build_model
from conftest import write_idx
from gsm.experiments import layout
from gsm.experiments.configs import LENET_BASE, RC_BASE
from gsm.weights_io import save_hdf5
from script_runs import SCRIPTS, call_script, fingerprint, run_script

pytestmark = pytest.mark.usefixtures("single_thread")

LENET_SMOKE = ["--scale", "0.01", "--device", "cpu", "--no-progress"]
RC_SMOKE = ["--scale", "0.002", "--device", "cpu", "--no-progress"]
MNIST_FIX = "point MNIST_PATH (or the data root argument) at the folder holding the dataset"
CIFAR_FIX = "point CIFAR10_PATH (or the data root argument) at the folder holding the dataset"
LENET_BASE_DIR = Path(layout.LOTTERY_EXPS) / "lottery_lenet300_base"
LENET_GSM_DIR = Path(layout.LOTTERY_EXPS) / "lottery_lenet300_compress60_gsm"
RC_BASE_DIR = Path(layout.GSM_EXPS) / "rc56_base_train"
INIT, FINISH = layout.INIT_WEIGHTS, layout.FINISH_WEIGHTS
CONFIG, CHECKPOINT = layout.STAGE_CONFIG, layout.CHECKPOINT


def script_name(script: str) -> str:
    return SCRIPTS[script].name


def assert_one_line_error(status, out: str, err: str, script: str, code: int, *fragments: str) -> str:
    """Exit `code`, nothing on stdout, no traceback, and one error line (after argparse's usage lines for a
    usage error) that holds every fragment. Returns that line."""
    assert status == code, (status, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert [line for line in lines if "error:" in line] == [lines[-1]], err
    if code == 2:
        assert lines[0].startswith(f"usage: {script_name(script)}"), err
    else:
        assert len(lines) == 1, err
    assert lines[-1].startswith(f"{script_name(script)}: error: "), lines[-1]
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    assert out == ""
    return lines[-1]


# ---------------------------------------------------------------------------------------------------------
# Data and result files


def write_mnist(root: Path, num_train: int = 300, num_test: int = 40, side: int = 28, num_labels=None,
                top_label: int = 9) -> Path:
    """Random (unlearnable but well-formed) MNIST IDX files under root/MNIST/raw."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    for split, count in (("train", num_train), ("t10k", num_test)):
        labels = np.arange(count if num_labels is None or split == "t10k" else num_labels) % 10
        if labels.size:
            labels[0] = top_label
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (count, side, side)),
                  dataset.IDX_IMAGES_MAGIC)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels, dataset.IDX_LABELS_MAGIC)
    return root


def write_cifar(root: Path, per_file: int = 16, test_count: int = 20) -> Path:
    """Random CIFAR-10 python batches under root/cifar-10-batches-py (80 training images: batch 64 fits)."""
    folder = root / dataset.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in [(f"data_batch_{i}", per_file) for i in range(1, 6)] + [("test_batch", test_count)]:
        batch = {b"labels": list(rng.integers(0, 10, count)), b"data": rng.integers(0, 256, (count, 3072),
                                                                                      dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch))
    return root


def stage_config(model: str, train: dict) -> dict:
    """The configuration the scripts record for a base stage at seed 0 (gsm.experiments.lottery and gsm.experiments.rc56)."""
    return {"stage": "base", "model": model, "seed": 0, "train": train}


def write_finished_base(folder: Path, model: str, config: dict, weights_model: str) -> None:
    """A finished base stage as a run leaves it: init.hdf5, finish.hdf5, config.json and log.txt."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    save_hdf5(build_model(weights_model), folder / INIT)
    save_hdf5(build_model(weights_model), folder / FINISH)
    (folder / CONFIG).write_text(json.dumps(config, indent=1, sort_keys=True))
    (folder / layout.LOG).write_text("2024-01-01 00:00:00,000 train INFO: validate at epoch 2, top1=50.00000, "
                                         "top5=90.00000, loss=1.000000\n")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Valid MNIST and CIFAR roots, a template out-root with a finished LeNet-300-100 lottery base and a
    finished rc56 base (whose finish.hdf5 is another model's: every rc56 run on it must stop), a regular
    file, and a hard-pruned-looking weights file."""
    work = tmp_path_factory.mktemp("bad_inputs")
    results = work / "results"
    write_finished_base(results / LENET_BASE_DIR, "lenet300",
                        stage_config("lenet300", LENET_BASE.scaled(0.01).to_dict()), "lenet300")
    rc_config = stage_config("rc56", RC_BASE.scaled(0.002).to_dict())
    write_finished_base(results / RC_BASE_DIR, "rc56", rc_config, "lenet300")
    (work / "file.txt").write_text("a regular file, not a folder")
    return {"work": work, "results": results, "mnist": write_mnist(work / "mnist"),
            "cifar": write_cifar(work / "cifar"), "file": work / "file.txt"}


@pytest.fixture
def results(inputs, tmp_path) -> Path:
    """A private copy of the template out-root, for a case to damage."""
    return Path(shutil.copytree(inputs["results"], tmp_path / "results"))


@pytest.fixture
def no_network(monkeypatch):
    """Any download fails at once (the scripts would otherwise try to fetch a missing dataset)."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# ---------------------------------------------------------------------------------------------------------
# Usage errors: exit 2


def placeholders(inputs) -> dict:
    """What the upper-case words of the cases stand for (longest first, for substituting into messages)."""
    return {"FILE/sub": inputs["file"] / "sub", "FILE": inputs["file"], "MISSING": inputs["work"] / "missing",
            "OUT": inputs["results"], "MNIST": inputs["mnist"], "CIFAR": inputs["cifar"]}


def substitute(argv, inputs) -> list:
    return [str(placeholders(inputs).get(a, a)) for a in argv]


def substitute_text(message: str, inputs) -> str:
    for word, path in placeholders(inputs).items():
        if word.startswith(("FILE", "MISSING")):
            message = message.replace(word, str(path))
    return message


LENET_COMMON = [*LENET_SMOKE, "--out-root", "OUT", "--data-root", "MNIST"]
RC_COMMON = [*RC_SMOKE, "--out-root", "OUT", "--data-root", "CIFAR"]
RATIO_MESSAGE = "compression ratio must be a finite number > 1, got "
USAGE_CASES = [
    *[pytest.param(net, [*LENET_COMMON, *args], message, id=f"{net}: {' '.join(args) or 'no ratio'}")
      for net in ("lenet300", "lenet5") for args, message in [
          ([], "the following arguments are required: ratio"),
          (["abc"], "compression ratio must be a number > 1, got 'abc'"),
          (["0"], RATIO_MESSAGE + "'0'"),
          (["-5"], RATIO_MESSAGE + "'-5'"),
          (["1"], RATIO_MESSAGE + "'1'"),
          (["0.5"], RATIO_MESSAGE + "'0.5'"),
          (["nan"], RATIO_MESSAGE + "'nan'"),
          (["inf"], RATIO_MESSAGE + "'inf'"),
          (["1e300"], "compression ratio 1e+300 keeps none of the "),
          (["60", "30", "abc"], "compression ratio must be a number > 1, got 'abc'"),  # a sweep: checked first
          (["60", "1e300"], "compression ratio 1e+300 keeps none of the "),
          (["60", "--bogus"], "unrecognized arguments: --bogus"),
          (["60", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
          (["60", "--scale", "-1"], "argument --scale: expected a positive number, got '-1'"),
          (["60", "--out-root", "FILE/sub"], "cannot create FILE/sub: Not a directory; choose another with --out-root"),
          (["60", "--out-root", "FILE"], "cannot create FILE: File exists; choose another with --out-root"),
      ]],
    pytest.param("lenet300", [*LENET_COMMON, "300000"],
                 "compression ratio 300000 keeps none of the 266200 prunable weights of lenet300; use a ratio of at "
                 "most 266200", id="lenet300: ratio above N"),
    *[pytest.param("rc56", [*RC_COMMON, *args], message, id=f"rc56: {' '.join(args)}") for args, message in [
        (["--ratio"], "argument --ratio: expected one argument"),
        (["--ratio", "abc"], "compression ratio must be a number > 1, got 'abc'"),
        (["--ratio", "0"], RATIO_MESSAGE + "'0'"),
        (["--ratio", "-3"], RATIO_MESSAGE + "'-3'"),
        (["--ratio", "1"], RATIO_MESSAGE + "'1'"),
        (["--ratio", "0.99"], RATIO_MESSAGE + "'0.99'"),
        (["--ratio", "nan"], RATIO_MESSAGE + "'nan'"),
        (["--ratio", "1e400"], RATIO_MESSAGE + "'1e400'"),
        (["--ratio", "1e300"], "compression ratio 1e+300 keeps none of the 851504 prunable weights of rc56; use a "
                               "ratio of at most 851504"),
        (["--arch", "rc57"], "argument --arch: invalid choice: 'rc57'"),
        (["10"], "unrecognized arguments: 10"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--scale", "0"], "argument --scale: expected a positive number, got '0'"),
        (["--out-root", "FILE/sub"], "cannot create FILE/sub: Not a directory; choose another with --out-root"),
    ]],
    *[pytest.param("show_log", args, message, id=f"show_log: {' '.join(args)}") for args, message in [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--root"], "argument --root: expected one argument"),
        (["--root", "MISSING"], "--root MISSING: not a folder; pass the folder that holds gsm_exps/"),
        (["--root", "FILE"], "--root FILE: not a folder; pass the folder that holds gsm_exps/"),
        (["extra"], "extra: not a folder; pass the folder that holds gsm_exps/"),  # roots are positional
        (["--plot", "out.txt"], "out.txt: the plot is written as .png or .pdf"),
    ]],
    *[pytest.param("display_hdf5", args, message, id=f"display_hdf5: {' '.join(args) or 'no file'}")
      for args, message in [
          ([], "the following arguments are required: file"),
          (["a.hdf5", "--plot", "a.hdf5"], "a.hdf5: the plot is written as .png or .pdf"),
          (["a.hdf5", "--bogus"], "unrecognized arguments: --bogus"),
      ]],
]


@pytest.mark.parametrize("script, argv, message", USAGE_CASES)
def test_usage_errors(script, argv, message, inputs, monkeypatch, capsys):
    before = fingerprint(inputs["results"])
    status, out, err = call_script(script, substitute(argv, inputs), monkeypatch, capsys)
    assert_one_line_error(status, out, err, script, 2, substitute_text(message, inputs))
    assert fingerprint(inputs["results"]) == before
    assert not (inputs["work"] / "missing").exists()


def test_file_in_the_way_of_a_stage_folder(inputs, tmp_path, monkeypatch, capsys):
    """The out-root is fine but its gsm_lottery_ticket_exps is a file: the stage folder cannot be made."""
    out_root = tmp_path / "out"
    out_root.mkdir()
    (out_root / layout.LOTTERY_EXPS).write_text("not a folder")
    before = fingerprint(out_root)
    status, out, err = call_script("lenet300", ["60", *LENET_SMOKE, "--out-root", out_root, "--data-root",
                                                inputs["mnist"]], monkeypatch, capsys)
    # The first folder the run takes is its GSM folder (its lock, before anything is written).
    assert_one_line_error(status, out, err, "lenet300", 1, f"Not a directory ({out_root / LENET_GSM_DIR}); fix "
                          "that path, then run the same command again")
    assert fingerprint(out_root) == before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_root(inputs, tmp_path, monkeypatch, capsys):
    out_root = tmp_path / "read_only"
    out_root.mkdir()
    out_root.chmod(0o555)
    try:
        status, out, err = call_script("lenet300", ["60", *LENET_SMOKE, "--out-root", out_root], monkeypatch, capsys)
    finally:
        out_root.chmod(0o755)
    assert_one_line_error(status, out, err, "lenet300", 2, f"--out-root: {out_root} is not a writable folder")
    assert list(out_root.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Dataset files: exit 1, naming the file, the cause and the variable that points at the data


def replace_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def mnist_file(root: Path, name: str = "train-images-idx3-ubyte") -> Path:
    return root / "MNIST" / "raw" / name


MNIST_CASES = {
    "empty folder": (lambda root: root.mkdir(), "MNIST/raw/train-images-idx3-ubyte.gz: missing and every download "
                                                "failed: download of https://"),
    "bad magic": (lambda root: replace_file(mnist_file(write_mnist(root)), b"\x00\x00\x08\x04" +
                                            mnist_file(root).read_bytes()[4:]),
                  "train-images-idx3-ubyte: bad magic 0x00000804, expected 0x00000803"),
    "truncated images": (lambda root: replace_file(mnist_file(write_mnist(root)), mnist_file(root).read_bytes()[:-100]),
                         "train-images-idx3-ubyte: truncated: 235116 bytes, header shape (300, 28, 28) implies 235216"),
    "wrong image size": (lambda root: write_mnist(root, side=32), "wrong image shape (32, 32), expected (28, 28)"),
    "fewer labels than images": (lambda root: write_mnist(root, num_labels=299),
                                 "300 images but 299 labels in "),
    "label out of range": (lambda root: write_mnist(root, top_label=12), "label 12 out of range 0..9"),
    "corrupt gzip": (lambda root: (mnist_file(write_mnist(root)).unlink(),
                                   replace_file(mnist_file(root, "train-images-idx3-ubyte.gz"), b"\x1f\x8b\x08bad")),
                     "train-images-idx3-ubyte.gz: corrupt gzip archive"),
    "training split below one batch": (lambda root: write_mnist(root, num_train=100),
                                       "the training split has 100 examples, fewer than one batch of 256"),
    "empty test split": (lambda root: write_mnist(root, num_test=0), "the test split has no examples"),
}


@pytest.mark.parametrize("case", MNIST_CASES)
def test_bad_mnist(case, inputs, tmp_path, no_network, monkeypatch, capsys):
    make, message = MNIST_CASES[case]
    data_root = tmp_path / "data"
    make(data_root)
    before = fingerprint(inputs["results"])
    status, out, err = call_script("lenet300", ["60", *LENET_SMOKE, "--out-root", inputs["results"], "--data-root",
                                                data_root], monkeypatch, capsys)
    assert_one_line_error(status, out, err, "lenet300", 1, message, MNIST_FIX, str(data_root))
    assert fingerprint(inputs["results"]) == before


def test_data_root_that_is_a_file(inputs, no_network, monkeypatch, capsys):
    status, out, err = call_script("lenet5", ["125", *LENET_SMOKE, "--out-root", inputs["results"], "--data-root",
                                              inputs["file"]], monkeypatch, capsys)
    assert_one_line_error(status, out, err, "lenet5", 1, "cannot create folder", "Not a directory", MNIST_FIX)


def cifar_file(root: Path, name: str = "data_batch_1") -> Path:
    return root / dataset.CIFAR10_FOLDER / name


def cifar_batch(data, labels) -> bytes:
    return pickle.dumps({b"data": data, b"labels": labels})


CIFAR_CASES = {
    "empty folder": (lambda root: root.mkdir(), "download of https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
                                                "failed (URLError"),
    "truncated pickle": (lambda root: replace_file(cifar_file(write_cifar(root)), cifar_file(root).read_bytes()[:5000]),
                         "data_batch_1: corrupt pickle ("),
    "garbage": (lambda root: replace_file(cifar_file(write_cifar(root)), b"\x80\x04garbage" * 10),
                "data_batch_1: corrupt pickle ("),
    "wrong row length": (lambda root: replace_file(cifar_file(write_cifar(root)),
                                                   cifar_batch(np.zeros((16, 3000), np.uint8), [0] * 16)),
                         "data has shape (16, 3000) dtype uint8, expected uint8 [N, 3072]"),
    "not a dict": (lambda root: replace_file(cifar_file(write_cifar(root)), pickle.dumps([1, 2, 3])),
                   "pickle holds a list, expected a dict"),
    "no labels": (lambda root: replace_file(cifar_file(write_cifar(root), "test_batch"),
                                            pickle.dumps({b"data": np.zeros((4, 3072), np.uint8)})),
                  "test_batch: missing key 'labels'"),
    "training split below one batch": (lambda root: write_cifar(root, per_file=10),
                                       "the training split has 50 examples, fewer than one batch of 64"),
}


@pytest.mark.parametrize("case", CIFAR_CASES)
def test_bad_cifar(case, inputs, tmp_path, no_network, monkeypatch, capsys):
    make, message = CIFAR_CASES[case]
    data_root = tmp_path / "data"
    make(data_root)
    before = fingerprint(inputs["results"])
    status, out, err = call_script("rc56", [*RC_SMOKE, "--out-root", inputs["results"], "--data-root", data_root],
                                   monkeypatch, capsys)
    assert_one_line_error(status, out, err, "rc56", 1, message, CIFAR_FIX, str(data_root))
    assert fingerprint(inputs["results"]) == before


# ---------------------------------------------------------------------------------------------------------
# The files of a finished (or started) base stage: exit 1, naming the file and how to recover


def rewrite_hdf5(path: Path, change) -> None:
    """Rewrite a weights file after `change(arrays)` edits its {stored name: array} dict in place."""
    with h5py.File(path, "r") as f:
        arrays = {name: f[name][()] for name in f}
    change(arrays)
    path.unlink()
    with h5py.File(path, "w", track_order=True) as f:
        for name, value in arrays.items():
            f.create_dataset(name, data=value)


def lenet5_arrays(arrays: dict) -> None:
    arrays.clear()
    torch.manual_seed(0)
    arrays.update({k: v.numpy() for k, v in build_model("lenet5").state_dict().items()})


def with_group(path: Path) -> None:
    with h5py.File(path, "a") as f:
        f.create_group("optimizer").create_dataset("step", data=np.zeros(1))


def checkpoint_bytes(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def unfinished(base: Path, checkpoint: bytes) -> None:
    """The base as a killed run leaves it (no finish.hdf5), with the given checkpoint file."""
    (base / FINISH).unlink()
    (base / CHECKPOINT).write_bytes(checkpoint)


RESTORE = "restore that file, or delete {base} to train this stage again"
RESTART = "delete it to restart this stage from its beginning"
BASE_CASES = {
    "finish.hdf5 is text": (lambda b: (b / FINISH).write_text("validate at epoch 0\n"),
                            "finish.hdf5: not a readable hdf5 file (OSError)", RESTORE),
    "finish.hdf5 truncated": (lambda b: (b / FINISH).write_bytes((b / FINISH).read_bytes()[:5000]),
                              "finish.hdf5: not a readable hdf5 file", RESTORE),
    "finish.hdf5 empty": (lambda b: (b / FINISH).write_bytes(b""), "finish.hdf5: the file is empty (0 bytes)",
                          RESTORE),
    "finish.hdf5 is a folder": (lambda b: ((b / FINISH).unlink(), (b / FINISH).mkdir()),
                                "finish.hdf5: is a folder, not an hdf5 weights file", RESTORE),
    "finish.hdf5 missing a key": (lambda b: rewrite_hdf5(b / FINISH, lambda a: a.pop("linear3.bias")),
                                  "finish.hdf5 does not fit the model: missing keys: linear3.bias", RESTORE),
    "finish.hdf5 with an extra key": (
        lambda b: rewrite_hdf5(b / FINISH, lambda a: a.update({"linear4.weight": np.ones((2, 2), np.float32)})),
        "finish.hdf5 does not fit the model: unexpected keys: linear4.weight", RESTORE),
    "finish.hdf5 mis-shaped": (
        lambda b: rewrite_hdf5(b / FINISH, lambda a: a.update({"linear1.weight": np.ones((300, 700), np.float32)})),
        "does not fit the model: mis-shaped keys: linear1.weight (file (300, 700), model (300, 784))", RESTORE),
    "finish.hdf5 of lenet5": (
        lambda b: rewrite_hdf5(b / FINISH, lenet5_arrays),
        "does not fit the model: missing keys: linear3.weight, linear3.bias; unexpected keys: stem.conv1.weight",
        RESTORE),
    "finish.hdf5 holds strings": (
        lambda b: rewrite_hdf5(b / FINISH, lambda a: a.update({"linear1.bias": np.array([b"w"] * 300)})),
        "finish.hdf5: 'linear1.bias' holds |S1 data; a weights file holds only numeric arrays", RESTORE),
    "finish.hdf5 holds a group": (lambda b: with_group(b / FINISH), "'optimizer' is a group", RESTORE),
    "init.hdf5 mis-shaped": (
        lambda b: rewrite_hdf5(b / INIT, lambda a: a.update({"linear2.weight": np.ones((100, 299), np.float32)})),
        "init.hdf5 does not fit the model: mis-shaped keys: linear2.weight (file (100, 299), model (100, 300))",
        RESTORE),
    "init.hdf5 missing": (lambda b: (b / INIT).unlink(), "init.hdf5: no such file", RESTORE),
    "config.json corrupt": (lambda b: (b / CONFIG).write_text('{"stage": "base", '),
                            "config.json: unreadable stage configuration (JSONDecodeError: ",
                            "restore it, or delete {base} to train this stage again"),
    "config.json not an object": (lambda b: (b / CONFIG).write_text("[1, 2]"),
                                  "config.json: unreadable stage configuration (not a JSON object)",
                                  "restore it, or delete {base} to train this stage again"),
    "checkpoint garbage": (lambda b: unfinished(b, b"these bytes are not a checkpoint"),
                           "checkpoint.pt: unreadable checkpoint (", RESTART),
    "checkpoint truncated": (lambda b: unfinished(b, checkpoint_bytes({"next_epoch": 1, "w": torch.ones(999)})[:700]),
                             "checkpoint.pt: unreadable checkpoint (", RESTART),
    "checkpoint of something else": (lambda b: unfinished(b, checkpoint_bytes([1, 2, 3])),
                                     "checkpoint.pt belongs to a run with another configuration",
                                     "use another --out-root, or delete {base} to start this stage again"),
}


@pytest.mark.parametrize("case", BASE_CASES)
def test_damaged_lenet_base(case, results, inputs, monkeypatch, capsys):
    damage, problem, fix = BASE_CASES[case]
    base = results / LENET_BASE_DIR
    damage(base)
    before = fingerprint(results)
    status, out, err = call_script("lenet300", ["5", *LENET_SMOKE, "--out-root", results, "--data-root",
                                                inputs["mnist"]], monkeypatch, capsys)
    line = assert_one_line_error(status, out, err, "lenet300", 1, problem, fix.format(base=base))
    assert len(line) < 1000
    assert fingerprint(results) == before  # nothing written, removed or touched
    assert not (results / layout.LOTTERY_EXPS / "lottery_lenet300_compress5_gsm").exists()


def test_rc56_base_with_another_models_weights(inputs, monkeypatch, capsys):
    """The template's rc56 base holds LeNet-300-100 weights: a foreign model is named in one short line."""
    results = inputs["results"]
    before = fingerprint(results)
    status, out, err = call_script("rc56", [*RC_SMOKE, "--out-root", results, "--data-root", inputs["cifar"]],
                                   monkeypatch, capsys)
    line = assert_one_line_error(status, out, err, "rc56", 1, f"{results / RC_BASE_DIR / FINISH} does not fit the "
                                 "model: missing keys: ", " more; unexpected keys: linear1.weight, linear1.bias",
                                 RESTORE.format(base=results / RC_BASE_DIR))
    assert len(line) < 2000
    assert fingerprint(results) == before


def test_intact_bases_are_accepted(inputs, results, monkeypatch, capsys):
    """The control for the cases above: with nothing damaged, each script gets past its base (the rc56 one
    with rc56 weights) to the GSM stage, stopped here by an interrupt."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    rc_base = results / RC_BASE_DIR
    torch.manual_seed(0)
    save_hdf5(build_model("rc56"), rc_base / FINISH)
    save_hdf5(build_model("rc56"), rc_base / INIT)
    before = fingerprint(results)
    monkeypatch.setattr(gsm.experiments.lottery, "gsm_stage", interrupt)
    monkeypatch.setattr(gsm.experiments.rc56, "gsm_stage", interrupt)
    for script, argv in (("lenet300", ["5", *LENET_SMOKE, "--data-root", inputs["mnist"]]),
                         ("rc56", [*RC_SMOKE, "--data-root", inputs["cifar"]])):
        status, _, err = call_script(script, [*argv, "--out-root", results], monkeypatch, capsys)
        assert status == 130, err
    assert fingerprint(results) == before


# ---------------------------------------------------------------------------------------------------------
# display_hdf5.py on files that are not weights: exit 1


def hdf5_with(path: Path, fill) -> Path:
    with h5py.File(path, "w") as f:
        fill(f)
    return path


DISPLAY_CASES = {
    "missing": (lambda p: None, "missing.hdf5: no such file"),
    "text": (lambda p: p.write_text("validate at epoch 0, top1=10.0\n"), "text.hdf5: not a readable hdf5 file"),
    "empty": (lambda p: p.write_bytes(b""), "empty.hdf5: the file is empty (0 bytes)"),
    "truncated": (lambda p: (save_hdf5(build_model("lenet300"), p), p.write_bytes(p.read_bytes()[:4000])),
                  "truncated.hdf5: not a readable hdf5 file"),
    "folder": (lambda p: p.mkdir(), "folder.hdf5: is a folder, not an hdf5 weights file"),
    "group": (lambda p: hdf5_with(p, lambda f: f.create_group("g").create_dataset("w", data=np.ones(2))),
              "group.hdf5: 'g' is a group"),
    "no arrays": (lambda p: hdf5_with(p, lambda f: None), "no arrays.hdf5: the file holds no arrays"),
    "strings": (lambda p: hdf5_with(p, lambda f: f.create_dataset("names", data=np.array([b"conv1", b"fc"]))),
                "strings.hdf5: 'names' holds |S5 data; a weights file holds only numeric arrays"),
}


@pytest.mark.parametrize("case", DISPLAY_CASES)
def test_display_hdf5_on_files_that_are_not_weights(case, tmp_path, monkeypatch, capsys):
    make, problem = DISPLAY_CASES[case]
    path = tmp_path / f"{case}.hdf5"
    make(path)
    before = fingerprint(tmp_path)
    status, out, err = call_script("display_hdf5", [path], monkeypatch, capsys)
    assert_one_line_error(status, out, err, "display_hdf5", 1, problem, "give the path of an hdf5 weights file")
    assert fingerprint(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------
# The same end to end in real processes (each spends ~2 s importing torch, so only a few, side by side)


def test_as_processes(inputs, tmp_path):
    results = Path(shutil.copytree(inputs["results"], tmp_path / "results"))
    (results / LENET_BASE_DIR / FINISH).write_bytes((results / LENET_BASE_DIR / FINISH).read_bytes()[:5000])
    truncated_cifar = tmp_path / "cifar"
    CIFAR_CASES["truncated pickle"][0](truncated_cifar)
    truncated_weights = tmp_path / "weights.hdf5"
    DISPLAY_CASES["truncated"][0](truncated_weights)
    cases = {
        "lenet300": (["5", *LENET_SMOKE, "--out-root", results, "--data-root", inputs["mnist"]], 1,
                     ["finish.hdf5: not a readable hdf5 file", "restore that file, or delete"]),
        "rc56": ([*RC_SMOKE, "--ratio", "0.5", "--out-root", results], 2, [RATIO_MESSAGE + "'0.5'"]),
        "rc56 data": ([*RC_SMOKE, "--out-root", results, "--data-root", truncated_cifar], 1,
                      ["data_batch_1: corrupt pickle", CIFAR_FIX]),
        "display_hdf5": ([truncated_weights], 1, ["not a readable hdf5 file", "give the path of an hdf5"]),
        "show_log": (["--root", inputs["file"]], 2, ["not a folder"]),
    }
    before = fingerprint(results)
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(zip(cases, pool.map(lambda name: run_script(name.split()[0], cases[name][0], tmp_path,
                                                                timeout=120, fresh_interpreter=True), cases)))
    for name, (_, code, fragments) in cases.items():
        result = runs[name]
        assert_one_line_error(result.returncode, result.stdout, result.stderr, name.split()[0], code, *fragments)
    assert fingerprint(results) == before
