"""examples/prune_a_transformer.py: the corpus reader on a generated folder, the tied output ranked once, and a
tiny end-to-end run that writes what the other experiments write and resumes without training again."""
import json
import sys
from pathlib import Path

import h5py
import pytest
import torch

import gsm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import prune_a_transformer as example  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def write_corpus(root: Path, files: int = 40, size: int = 3000) -> dict:
    """.py files in nested folders (and files the reader must skip); returns {relative path: bytes} of the .py
    files it should read."""
    written = {}
    for i in range(files):
        relative = f"pkg{i % 3}/sub{i % 2}/mod{i}.py"
        data = (f"# module {i}\n" + f"def f{i}(x):\n    return x * {i}\n" * (size // 30)).encode()
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
        written[relative] = data
    for skipped in ("site-packages/third.py", "pkg0/__pycache__/mod0.py", "pkg1/notes.txt"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_bytes(b"never read\n")
    return written


def test_corpus_reader_on_a_generated_folder(tmp_path):
    written = write_corpus(tmp_path)
    corpus = example.read_corpus(str(tmp_path))
    held = sorted(path for path in written if example.held_out(path))
    kept = sorted(path for path in written if not example.held_out(path))
    assert held and kept  # the hash puts some of the 40 files on each side
    assert (corpus.train_files, corpus.validation_files) == (len(kept), len(held))

    def walk_order(paths):  # folders before files at each level, both sorted: os.walk with sorted lists
        return sorted(paths, key=lambda p: [(0, part) for part in Path(p).parts[:-1]] + [(1, Path(p).name)])
    assert bytes(corpus.train.numpy()) == b"".join(written[p] for p in walk_order(kept))
    assert bytes(corpus.validation.numpy()) == b"".join(written[p] for p in walk_order(held))
    assert b"never read" not in bytes(corpus.train.numpy()) + bytes(corpus.validation.numpy())
    assert example.held_out("pkg0/sub0/mod0.py") == example.held_out("pkg0/sub0/mod0.py")  # no state
    # A folder whose files all fall on one side cannot give both sets.
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / kept[0].replace("/", "_")).write_bytes(b"x = 1\n" * 50)
    if not example.held_out(kept[0].replace("/", "_")):
        with pytest.raises(SystemExit, match="both training and validation"):
            example.read_corpus(str(tmp_path / "one"))


def test_the_tied_output_is_ranked_once():
    torch.manual_seed(0)
    model = example.TinyGPT(context=16, width=32, depth=1, heads=2)
    names = example.prunable_names(model, embeddings=True)
    assert names.count("embedding.weight") == 1
    optimizer = gsm.GSM(example.gsm_groups(model, names, 1e-3), lr=0.1, momentum=0.9, nonzero_ratio=0.1)
    unique = sum(p.numel() for name, p in model.named_parameters() if name in names)
    assert optimizer.num_prunable == unique == 256 * 32 + 16 * 32 + 12 * 32 * 32
    tokens = torch.randint(0, 256, (4, 17))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 256), tokens[:, 1:].reshape(-1))
    loss.backward()
    # The tied tensor has one gradient, the sum of its uses as input embedding and as output layer.
    assert model.embedding.weight.grad is not None
    optimizer.step()
    assert optimizer.num_active == optimizer.keep_count == int(0.1 * unique)


def test_a_tiny_run_writes_the_files_and_resumes(tmp_path, capsys):
    write_corpus(tmp_path / "corpus", files=30, size=6000)
    out = tmp_path / "out"
    args = ["10", "--scale", "0.002", "--corpus", str(tmp_path / "corpus"), "--out-root", str(out), "--no-progress",
            "--width", "32", "--depth", "1", "--seed", "3"]
    assert example.main(args) == 0
    first = capsys.readouterr().out
    exps = out / "transformer_exps"
    for folder in ("compress10_gsm", "compress10_magnitude"):
        assert sorted(p.name for p in (exps / folder).iterdir()) == [
            "finish.hdf5", "finish_pruned_sparse.hdf5", "mask.hdf5", "result.json"]
    results = json.loads((exps / "results.json").read_text())
    assert (results["config"]["dense_steps"], results["config"]["prune_steps"], results["config"]["width"]) == (
        6, 4, 32)
    gsm_arm = results["ratios"]["10"]["gsm"]
    prunable = results["prunable"]
    assert prunable == 12 * 32 * 32 and results["parameters"] == prunable + (256 + 64) * 32 + 3 * 2 * 32
    # The hard prune's count: N minus int(N * (1 - 1/R)) pruned (docs/design.md, section 1).
    assert gsm_arm["kept"] == results["ratios"]["10"]["magnitude"]["kept"] == prunable - int(prunable * 0.9)
    assert gsm_arm["kept_by_kind"]["embedding"] == [(256 + 64) * 32] * 2  # kept dense by default
    mask = gsm.load_mask(exps / "compress10_gsm" / "mask.hdf5")
    assert gsm.mask_count(mask) == gsm_arm["kept"]
    pruned = gsm.load_sparse(exps / "compress10_gsm" / "finish_pruned_sparse.hdf5")
    assert all(torch.count_nonzero(pruned[name]) <= int(mask[name].sum()) for name in mask)
    with h5py.File(exps / "compress10_gsm" / "finish_pruned_sparse.hdf5", "r") as f:
        assert sorted(f["sparse"]) == sorted(mask)
    assert "10x: GSM" in first and "GSM keeps: embedding" in first
    # The same command again trains nothing: every arm is read back.
    stamp = (exps / "dense" / "finish.hdf5").stat().st_mtime_ns
    assert example.main(args) == 0
    assert (exps / "dense" / "finish.hdf5").stat().st_mtime_ns == stamp
    assert json.loads((exps / "results.json").read_text())["ratios"] == results["ratios"]
    # Another seed in the same folder is refused.
    with pytest.raises(SystemExit, match="holds a run with other settings"):
        example.main(args[:-1] + ["4"])
    # The table and the plot over roots.
    assert example.main(["--summarize", str(out), str(out), "--plot", str(tmp_path / "t.png")]) == 0
    table = capsys.readouterr().out
    assert "| 10x |" in table and "+-" in table and (tmp_path / "t.png").stat().st_size > 10_000
