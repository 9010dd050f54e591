"""Tests for display_hdf5.py, its main run in process on a hard-pruned LeNet-300-100 and on unreadable files."""
from __future__ import annotations

import io
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

import display_hdf5
from base_model import build_model
from gsm.pruning import apply_mask_to_weights, global_magnitude_mask
from gsm.weights_io import save_hdf5

SCRIPT = Path(__file__).resolve().parents[1] / "display_hdf5.py"
ARRAY_LINE = re.compile(r"^(\S+)\s+shape=(\([0-9, ]*\))\s+mean=\s*(\S+)\s+std=(\S+)\s+"
                        r"positive=(\d+)\s+negative=(\d+)\s+zero=(\d+)$")


def run_scripts(argument_lists: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Run the script's main once per argument list in this process (what `python display_hdf5.py ARGS` runs),
    as (exit status, stdout, stderr); the command line itself is run as a process in test_bad_inputs."""
    results = {}
    for key, args in argument_lists.items():
        out, err = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as patch, redirect_stdout(out), redirect_stderr(err):
            patch.setattr(sys, "argv", [str(SCRIPT), *args])
            try:
                status = display_hdf5.main(args)
            except SystemExit as exc:
                status = exc.code
        results[key] = subprocess.CompletedProcess([str(SCRIPT), *args], status or 0, out.getvalue(), err.getvalue())
    return results


@pytest.fixture(scope="module")
def pruned_lenet300(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    model = build_model("lenet300")
    with torch.no_grad():
        for layer in (model.linear1, model.linear2, model.linear3):
            layer.bias.uniform_(-1, 1)
            layer.bias[:3] = 0.0
    apply_mask_to_weights(model, global_magnitude_mask(model, 1 / 60))
    path = tmp_path_factory.mktemp("display") / "finish_pruned.hdf5"
    save_hdf5(model, path)
    return path, {k: v.numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(pruned_lenet300, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("unreadable")
    (folder / "text.hdf5").write_text("validate at epoch 0, top1=10.0\n")
    (folder / "empty.hdf5").write_bytes(b"")
    return run_scripts({
        "pruned": [str(pruned_lenet300[0])],
        "missing": [str(folder / "missing.hdf5")],
        "text": [str(folder / "text.hdf5")],
        "empty": [str(folder / "empty.hdf5")],
        "no argument": [],
        "help": ["--help"],
    })


@pytest.fixture(scope="module")
def output(runs) -> subprocess.CompletedProcess:
    return runs["pruned"]


def test_runs_cleanly(output):
    assert output.returncode == 0, output.stderr
    assert output.stderr == ""


def test_every_array_line(output, pruned_lenet300):
    arrays = pruned_lenet300[1]
    parsed = {}
    for line in output.stdout.splitlines():
        match = ARRAY_LINE.match(line)
        if match:
            parsed[match.group(1)] = match.groups()[1:]
    assert list(parsed) == list(arrays)
    for name, array in arrays.items():
        shape, mean, std, positive, negative, zero = parsed[name]
        assert shape == str(tuple(array.shape))
        assert int(positive) == int((array > 0).sum())
        assert int(negative) == int((array < 0).sum())
        assert int(zero) == int((array == 0).sum())
        assert int(positive) + int(negative) + int(zero) == array.size
        assert float(mean) == pytest.approx(float(array.astype(np.float64).mean()), rel=1e-5, abs=1e-12)
        assert float(std) == pytest.approx(float(array.astype(np.float64).std()), rel=1e-5)
    # The pruned weights are mostly zero; the biases have exactly the three zeros set above.
    assert int(parsed["linear1.weight"][5]) > 230000
    assert [int(parsed[f"linear{i}.bias"][5]) for i in (1, 2, 3)] == [3, 3, 3]


def test_summary(output, pruned_lenet300):
    arrays = pruned_lenet300[1]
    text = output.stdout
    assert re.search(r"^prunable parameters: 266200$", text, re.M)
    assert re.search(r"^non-zeros: 4437$", text, re.M)
    ratio = float(re.search(r"^compression ratio: (\S+)$", text, re.M).group(1))
    assert ratio == pytest.approx(266200 / 4437, abs=1e-3) and 59.9 < ratio < 60.1
    sparsity = float(re.search(r"^sparsity: (\S+)$", text, re.M).group(1))
    assert sparsity == pytest.approx(1 - 4437 / 266200, abs=1e-6)
    rows = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[0] in arrays and "=" not in line:
            rows[fields[0]] = fields[1:]
    assert list(rows) == ["linear1.weight", "linear2.weight", "linear3.weight"]
    for name, (elements, nonzeros, density) in rows.items():
        assert int(elements) == arrays[name].size
        assert int(nonzeros) == int(np.count_nonzero(arrays[name]))
        assert float(density) == pytest.approx(int(nonzeros) / int(elements), abs=5e-5)
    assert sum(int(r[1]) for r in rows.values()) == 4437


@pytest.mark.parametrize("kind", ["missing", "text", "empty"])
def test_unreadable_file_is_one_line_error(runs, kind):
    result = runs[kind]
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("display_hdf5.py: error:")
    assert f"{kind}.hdf5" in lines[0]
    assert "Traceback" not in result.stderr


def test_usage_errors_and_help(runs):
    no_argument = runs["no argument"]
    assert no_argument.returncode == 2
    assert "usage:" in no_argument.stderr and "Traceback" not in no_argument.stderr
    help_text = runs["help"]
    assert help_text.returncode == 0
    assert "usage:" in help_text.stdout and "file" in help_text.stdout


def test_plot_draws_each_files_layer_densities_side_by_side(tmp_path: Path) -> None:
    import display_hdf5

    torch.manual_seed(0)
    files = {}
    for name, ratio in (("dense", 1.0), ("sparse", 0.01)):
        model = build_model("lenet300")
        if ratio < 1.0:
            apply_mask_to_weights(model, global_magnitude_mask(model, ratio))
        files[name] = tmp_path / f"{name}.hdf5"
        save_hdf5(model, files[name])
    arrays = {name: display_hdf5.read_hdf5(path) for name, path in files.items()}
    layers, counts = display_hdf5.layer_densities(arrays)
    assert layers == ["linear1.weight", "linear2.weight", "linear3.weight"]
    assert counts["dense"] == [(235200, 235200), (30000, 30000), (1000, 1000)]
    assert [elements for elements, _ in counts["sparse"]] == [235200, 30000, 1000]
    assert sum(nonzeros for _, nonzeros in counts["sparse"]) == 266200 - int(266200 * (1 - 0.01))
    plot = tmp_path / "density.png"
    assert display_hdf5.main([str(files["dense"]), str(files["sparse"]), "--plot", str(plot)]) == 0
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 200_000
