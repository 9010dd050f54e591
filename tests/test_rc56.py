"""Smoke run of gsm/gsm_rc56.py on generated CIFAR-10 files in the real pickle format (in this process, through
the script's own main; as processes where compiled and eager runs are compared side by side)."""
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from crafted import MakesFolder
from gsm.pruning import sparsity_report
from gsm.weights_io import read_hdf5
from script_runs import call_script, entries, run_script



def write_fake_cifar10(root: Path, train_per_file: int = 32, test_count: int = 64) -> Path:
    """cifar-10-batches-py/ with five training pickles and a test pickle; label-dependent colours."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = [(f"data_batch_{i}", train_per_file) for i in range(1, 6)] + [("test_batch", test_count)]
    for name, count in files:
        labels = rng.integers(0, 10, count)
        data = (rng.integers(0, 40, (count, 3072)) + 20 * labels[:, None]).astype(np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data}, f)
    return root


def test_rc56_smoke_run_writes_base_gsm_and_a_10x_pruned_model(tmp_path, monkeypatch, capsys):
    data = write_fake_cifar10(tmp_path / "data")
    out = tmp_path / "out"
    # scale 0.002: 1 base epoch (of 500) and 1 GSM epoch (of 600), 2 iterations each at batch 64.
    args = ["--scale", "0.002", "--device", "cpu", "--data-root", data, "--out-root", out, "--no-progress"]
    status, _, err = call_script("rc56", args, monkeypatch, capsys)
    assert status == 0, err
    base, gsm_dir = out / "gsm_exps" / "rc56_base_train", out / "gsm_exps" / "rc56_gsm"
    assert entries(base) == ["config.json", "finish.hdf5", "init.hdf5", "log.txt"]
    assert entries(gsm_dir) == ["config.json", "finish.hdf5", "finish_pruned.hdf5", "finish_pruned.json",
                                "init.hdf5", "log.txt"]
    # GSM starts from the base result, BatchNorm buffers included.
    base_finish, gsm_init = read_hdf5(base / "finish.hdf5"), read_hdf5(gsm_dir / "init.hdf5")
    assert base_finish.keys() == gsm_init.keys()
    for key in base_finish:
        np.testing.assert_array_equal(base_finish[key], gsm_init[key])
    report = sparsity_report(read_hdf5(gsm_dir / "finish_pruned.hdf5"))
    assert (report.elements, report.nonzeros) == (851504, 85151)

    gsm_log = (gsm_dir / "log.txt").read_text()
    assert "hard-pruned model: kept 85151 of 851504 prunable weights (Q = 85150" in gsm_log
    assert [line.split("validate at epoch ")[1].split(",")[0] for line in gsm_log.splitlines()
            if "validate at epoch" in line] == ["0", "1"]

    status, shown, _ = call_script("display_hdf5", [gsm_dir / "finish_pruned.hdf5"], monkeypatch, capsys)
    assert status == 0 and "non-zeros: 85151" in shown and "compression ratio: 10.000" in shown

    # Rerunning finds both stages finished and trains nothing.
    logs_before = {p: p.read_text() for p in (base / "log.txt", gsm_dir / "log.txt")}
    status, _, err = call_script("rc56", args, monkeypatch, capsys)
    assert status == 0, err
    assert {p: p.read_text() for p in logs_before} == logs_before


def test_rc56_usage_errors_exit_2(tmp_path, monkeypatch, capsys):
    for args in (["--ratio", "1"], ["--ratio", "abc"], ["--arch", "rc57"], ["--compile", "fast"], ["--bogus"]):
        status, _, err = call_script("rc56", [*args, "--out-root", tmp_path], monkeypatch, capsys)
        assert status == 2 and "usage: gsm_rc56.py" in err, (args, err)
        assert "Traceback" not in err


def test_compiled_training_matches_eager_training(tmp_path):
    """--compile (here in mode reduce-overhead, whose CUDA graphs are skipped on the CPU) runs the whole
    script, and the base stage it trains matches the eager run's up to float rounding."""
    data = write_fake_cifar10(tmp_path / "data")
    common = ("--arch", "rc20", "--scale", "0.002", "--device", "cpu", "--data-root", str(data), "--no-progress")
    runs = {"eager": (), "compiled": ("--compile", "reduce-overhead")}
    with ThreadPoolExecutor(2) as pool:  # two one-thread processes side by side (compiling takes a while)
        results = dict(zip(runs, pool.map(lambda name: run_script("rc56", [*common, *runs[name], "--out-root",
                                                                           tmp_path / name], tmp_path), runs)))
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])

    def base_weights(name, file_name):
        return read_hdf5(tmp_path / name / "gsm_exps" / "rc20_base_train" / file_name)

    eager, compiled = base_weights("eager", "finish.hdf5"), base_weights("compiled", "finish.hdf5")
    assert eager.keys() == compiled.keys()
    for key in eager:
        np.testing.assert_allclose(compiled[key], eager[key], rtol=1e-3, atol=1e-4, err_msg=key)
    init = base_weights("eager", "init.hdf5")  # training moved the weights: the comparison is not of inits
    assert all(not np.array_equal(init[key], eager[key]) for key in eager if key.endswith("conv.weight"))
    for name in runs:
        log = (tmp_path / name / "gsm_exps" / "rc20_gsm" / "log.txt").read_text()
        assert "hard-pruned model: kept 27090 of 270896 prunable weights" in log, name


def test_crafted_cifar_batch_stops_the_script_without_running_it(tmp_path, monkeypatch, capsys):
    """A data_batch_1 whose unpickling would create a folder: the script stops in one line naming the file and
    the variable that chooses the dataset, exit 1, and the folder never appears."""
    data = write_fake_cifar10(tmp_path / "data")
    marker = tmp_path / "marker"
    crafted = {b"batch_label": b"x", b"labels": [0], b"data": np.zeros((1, 3072), np.uint8),
               b"extra": MakesFolder(marker)}
    (data / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(crafted, protocol=2))
    status, _, err = call_script("rc56", ["--scale", "0.002", "--device", "cpu", "--data-root", data, "--out-root",
                                          tmp_path / "out", "--no-progress"], monkeypatch, capsys)
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "data_batch_1" in lines[0] and "refused os.makedirs" in lines[0], lines
    assert "CIFAR10_PATH" in lines[0]
    assert not marker.exists()
