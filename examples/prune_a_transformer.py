"""Prune a transformer with GSM: a small decoder-only model on the source files of Python's standard library.

    python examples/prune_a_transformer.py                 # about half an hour on a 2-core CPU
    python examples/prune_a_transformer.py --scale 0.01    # under a minute (the tests run a smaller one)

Bytes are the tokens (256 of them); the held-out files (one in ten, chosen by a hash of their path) are the
validation set. A dense model is trained first (AdamW), then three arms start from it, at the same number of
kept weights:
  - GSM at each compression ratio R, then the hard prune to 1/R of the prunable weights;
  - the dense model pruned to 1/R by global magnitude, then fine-tuned with its mask (momentum SGD, the same
    schedule and number of steps as GSM);
  - the dense model itself.
Validation loss is reported in bits per byte. What is pruned: every weight matrix of the attention and the MLPs.
The token and position embeddings stay dense by default (--prune-embeddings ranks them too): with bytes as
tokens they are a small share of the weights, and the token embedding is also the output layer (tied), so a
pruned entry would take a byte's input feature and its output score at once; LayerNorms are scales, never
pruned. A tied weight is one parameter, ranked once.

Writes, under --out-root, transformer_exps/dense/finish.hdf5, and per ratio
transformer_exps/compress<R>_{gsm,magnitude}/ with finish.hdf5 (the pruned model), mask.hdf5 and
finish_pruned_sparse.hdf5 (the compressed export), plus transformer_exps/results.json with every curve and figure.
Each arm's folder also gets its result.json when it finishes, so the same command, run again after an
interruption, trains only the arms not yet done. --summarize ROOT... prints the table over several roots (seeds)
and --plot draws it.
"""
import argparse
import copy
import json
import math
import os
import sys
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

import gsm

# ---------------------------------------------------------------------------------------------------------
# The corpus: the standard library's .py files, bytes as tokens


@dataclass
class Corpus:
    """The training and validation bytes (uint8 tensors), and where they came from."""
    train: Tensor
    validation: Tensor
    root: str
    train_files: int
    validation_files: int


def held_out(relative_path: str, every: int = 10) -> bool:
    """Whether a file is in the validation set: one in `every`, by a hash of its path (the same on every run
    and machine, whatever the order files are listed in)."""
    return zlib.crc32(relative_path.encode("utf-8")) % every == 0


def read_corpus(root: Optional[str] = None, every: int = 10) -> Corpus:
    """Every .py file under `root` (default: this Python's standard library, without installed packages),
    in sorted order, split into training and validation files by `held_out`."""
    root = root or sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__"}
    paths = []
    for folder, folders, files in os.walk(root):
        folders[:] = sorted(f for f in folders if f not in skip)
        paths += [os.path.join(folder, name) for name in sorted(files) if name.endswith(".py")]
    parts: Dict[bool, List[bytes]] = {False: [], True: []}
    for path in paths:
        with open(path, "rb") as f:
            parts[held_out(os.path.relpath(path, root))].append(f.read())
    if not parts[False] or not parts[True]:
        raise SystemExit(f"{root}: needs .py files for both training and validation, found {len(paths)} files")

    def tensor(chunks: List[bytes]) -> Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    return Corpus(tensor(parts[False]), tensor(parts[True]), root, len(parts[False]), len(parts[True]))


def batch(data: Tensor, context: int, size: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """`size` random windows of `context` bytes and the bytes that follow each (inputs, targets)."""
    starts = torch.randint(0, data.numel() - context - 1, (size,), generator=generator)
    windows = torch.stack([data[s:s + context + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


# ---------------------------------------------------------------------------------------------------------
# The model: a small decoder-only transformer with the output tied to the token embedding


class Block(nn.Module):
    """LayerNorm, causal self-attention, residual; LayerNorm, MLP (4x, GELU), residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.fc = nn.Linear(width, 4 * width, bias=False)
        self.out = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch_size, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.view(batch_size, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch_size, length, width))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class TinyGPT(nn.Module):
    """Byte-level decoder-only transformer; the logits are the final features times the token embedding."""

    def __init__(self, context: int = 64, width: int = 192, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.context = context
        self.embedding = nn.Embedding(256, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embedding(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embedding.weight.t()


def kind_of(name: str) -> str:
    """Which part of the model a parameter belongs to: attention, MLP, embedding or norm."""
    if name.startswith(("embedding", "position")):
        return "embedding"
    if ".qkv." in name or ".proj." in name:
        return "attention"
    if ".fc." in name or ".out." in name:
        return "MLP"
    return "norm"


def prunable_names(model: TinyGPT, embeddings: bool) -> List[str]:
    """The weights GSM ranks and the hard prune counts: attention and MLP matrices, and the embeddings if asked."""
    return [name for name, p in model.named_parameters()
            if kind_of(name) in ("attention", "MLP") or (embeddings and kind_of(name) == "embedding")]


def gsm_groups(model: TinyGPT, names: Sequence[str], weight_decay: float) -> List[dict]:
    """Param groups: the prunable matrices decay and are ranked; everything else neither."""
    chosen = set(names)
    ranked = [p for name, p in model.named_parameters() if name in chosen]
    rest = [p for name, p in model.named_parameters() if name not in chosen]
    return [{"params": ranked, "weight_decay": weight_decay, "prunable": True},
            {"params": rest, "weight_decay": 0.0, "prunable": False}]


# ---------------------------------------------------------------------------------------------------------
# Training and evaluation


@torch.no_grad()
def bits_per_byte(model: TinyGPT, data: Tensor, windows: int = 256, size: int = 32) -> float:
    """Mean cross-entropy in bits per byte over `windows` fixed windows spread evenly over `data` (the same
    windows for every model and step), `size` at a time."""
    model.eval()
    context = model.context
    starts = torch.linspace(0, data.numel() - context - 2, windows).long()
    total = 0.0
    for chunk in starts.split(size):
        tokens = torch.stack([data[s:s + context + 1] for s in chunk.tolist()]).long()
        logits = model(tokens[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1), reduction="sum").item()
    model.train()
    return total / (windows * context) / math.log(2)


@dataclass
class Schedule:
    """Steps, peak lr, linear warmup, batch size, and the decay: 'cosine' to a tenth (the dense model), or 'step':
    constant, then a tenth for the last quarter (the pruning arms: GSM's passive weights decay at a rate
    proportional to the lr, so it stays high for most of the stage, as in the paper's schedules)."""
    steps: int
    lr: float
    warmup: int
    batch_size: int = 16
    decay: str = "cosine"

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        if self.decay == "step":
            return self.lr * (0.1 if progress >= 0.75 else 1.0)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(model: TinyGPT, optimizer: torch.optim.Optimizer, schedule: Schedule, corpus: Corpus, seed: int,
          label: str, evaluate_every: int, progress: bool, mask: Optional[Dict[str, Tensor]] = None
          ) -> List[Tuple[int, float]]:
    """Train for the schedule's steps (gradients clipped to norm 1; multiplied by `mask` when given, so that
    pruned weights stay zero); returns the validation curve [(step, bits per byte)], from step 0."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    masked = [(params[name], m.to(params[name].dtype)) for name, m in (mask or {}).items()]
    curve = [(0, bits_per_byte(model, corpus.validation))]
    bar = tqdm(range(schedule.steps), desc=label, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        inputs, targets = batch(corpus.train, model.context, schedule.batch_size, generator)
        loss = F.cross_entropy(model(inputs).reshape(-1, 256), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # one factor for every gradient: the ranking holds
        for p, m in masked:
            p.grad.mul_(m)
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise SystemExit(f"{label}: the loss became {loss.item()} at step {step}; lower the learning rate")
        if (step + 1) % evaluate_every == 0 or step + 1 == schedule.steps:
            curve.append((step + 1, bits_per_byte(model, corpus.validation)))
            bar.set_postfix(val_bpb=f"{curve[-1][1]:.3f}", refresh=False)
    return curve


def kept_by_kind(model: TinyGPT, mask: Dict[str, Tensor]) -> Dict[str, Tuple[int, int]]:
    """{attention, MLP, embedding: (kept, of)} over all of a kind's matrices (unranked ones count as kept)."""
    counts: Dict[str, List[int]] = {}
    for name, p in model.named_parameters():
        kind = kind_of(name)
        if kind == "norm":
            continue
        kept = int(mask[name].sum()) if name in mask else p.numel()
        total = counts.setdefault(kind, [0, 0])
        total[0] += kept
        total[1] += p.numel()
    return {kind: (kept, of) for kind, (kept, of) in counts.items()}


def save(model: TinyGPT, folder: Path, mask: Optional[Dict[str, Tensor]] = None) -> None:
    """The weights as the other experiments write them, and for a pruned model its mask and compressed export."""
    folder.mkdir(parents=True, exist_ok=True)
    gsm.save_hdf5(model, folder / "finish.hdf5")
    if mask is not None:
        gsm.save_mask(mask, folder / "mask.hdf5")
        gsm.save_sparse(model, folder / "finish_pruned_sparse.hdf5", names=list(mask))


@dataclass
class Config:
    """Every setting of a run; the step counts are multiplied by --scale."""
    dense_steps: int = 3000
    prune_steps: int = 2000
    dense_lr: float = 2e-3
    gsm_lr: float = 0.1
    gsm_momentum: float = 0.95
    gsm_weight_decay: float = 2.5e-3
    evaluate_every: int = 100
    context: int = 64
    width: int = 192
    depth: int = 4
    heads: int = 4
    batch_size: int = 16


FINAL_WINDOWS = 1024  # the reported figures: four times the curves' windows


def _arm(folder: Path, identity: dict, train_arm) -> dict:
    """An arm's result: read from `folder/result.json` when a run with the same `identity` finished it (so that
    the same command resumes after an interruption, arm by arm), else `train_arm()`, saved there."""
    path = folder / "result.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("identity") != identity:
            raise SystemExit(f"{folder} holds a run with other settings; use another --out-root or delete it")
        return saved
    result = {"identity": identity, **train_arm()}
    folder.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=1))
    os.replace(temporary, path)
    return result


def run(config: Config, ratios: Sequence[float], seed: int, out_root: Path, prune_embeddings: bool,
        progress: bool, corpus: Corpus) -> dict:
    """The dense model, then GSM and magnitude pruning at each ratio; returns every curve and figure."""
    torch.manual_seed(seed)
    dense = TinyGPT(config.context, config.width, config.depth, config.heads)
    exps = out_root / "transformer_exps"
    identity = {"config": asdict(config), "seed": seed, "prune_embeddings": prune_embeddings,
                "corpus_bytes": [corpus.train.numel(), corpus.validation.numel()]}
    started = time.perf_counter()

    def train_dense() -> dict:
        decay, rest = [], []
        for name, p in dense.named_parameters():
            (decay if p.dim() > 1 and kind_of(name) != "embedding" else rest).append(p)
        adam = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                 lr=config.dense_lr, betas=(0.9, 0.95))
        schedule = Schedule(config.dense_steps, config.dense_lr, max(1, config.dense_steps // 20),
                            config.batch_size)
        curve = train(dense, adam, schedule, corpus, seed, "dense", config.evaluate_every, progress)
        save(dense, exps / "dense")
        return {"curve": curve, "bpb": bits_per_byte(dense, corpus.validation, FINAL_WINDOWS)}

    dense_result = _arm(exps / "dense", identity, train_dense)
    gsm.load_hdf5(exps / "dense" / "finish.hdf5", dense)
    names = prunable_names(dense, prune_embeddings)
    results = {**identity, "python": sys.version.split()[0],
               "corpus_files": [corpus.train_files, corpus.validation_files],
               "prunable": sum(dict(dense.named_parameters())[n].numel() for n in names),
               "parameters": sum(p.numel() for p in dense.parameters()), "dense": dense_result, "ratios": {}}
    prune_schedule = Schedule(config.prune_steps, config.gsm_lr, 0, config.batch_size, decay="step")
    for ratio in ratios:
        def train_gsm() -> dict:
            """GSM from the dense model, then the hard prune to 1/R of the prunable weights."""
            model = copy.deepcopy(dense)
            optimizer = gsm.GSM(gsm_groups(model, names, config.gsm_weight_decay), lr=config.gsm_lr,
                                momentum=config.gsm_momentum, nesterov=True, nonzero_ratio=1.0 / ratio)
            curve = train(model, optimizer, prune_schedule, corpus, seed + 1, f"GSM {ratio:g}x",
                          config.evaluate_every, progress)
            readiness = gsm.prune_readiness(model, optimizer)
            before = bits_per_byte(model, corpus.validation, FINAL_WINDOWS)
            mask = optimizer.hard_mask(model)
            gsm.apply_mask_to_weights(model, mask)
            save(model, exps / f"compress{ratio:g}_gsm", mask)
            return {"curve": curve, "before_prune_bpb": before,
                    "bpb": bits_per_byte(model, corpus.validation, FINAL_WINDOWS), "kept": gsm.mask_count(mask),
                    "kept_by_kind": kept_by_kind(model, mask), "readiness_before_prune": asdict(readiness)}

        def train_magnitude() -> dict:
            """The dense model pruned to the same budget by global magnitude, fine-tuned under its mask for as
            many steps, with the same optimizer settings and batches."""
            model = copy.deepcopy(dense)
            mask = gsm.global_magnitude_mask(model, 1.0 / ratio, names=names)
            gsm.apply_mask_to_weights(model, mask)
            sgd = torch.optim.SGD(gsm_groups(model, names, config.gsm_weight_decay), lr=config.gsm_lr,
                                  momentum=config.gsm_momentum, nesterov=True)
            curve = train(model, sgd, prune_schedule, corpus, seed + 1, f"magnitude {ratio:g}x",
                          config.evaluate_every, progress, mask=mask)
            save(model, exps / f"compress{ratio:g}_magnitude", mask)
            return {"curve": curve, "bpb": bits_per_byte(model, corpus.validation, FINAL_WINDOWS),
                    "kept": gsm.mask_count(mask), "kept_by_kind": kept_by_kind(model, mask)}

        results["ratios"][f"{ratio:g}"] = {
            "gsm": _arm(exps / f"compress{ratio:g}_gsm", {**identity, "ratio": ratio}, train_gsm),
            "magnitude": _arm(exps / f"compress{ratio:g}_magnitude", {**identity, "ratio": ratio}, train_magnitude)}
    results["seconds"] = time.perf_counter() - started
    (exps / "results.json").write_text(json.dumps(results, indent=1))
    return results


def report(results: dict) -> List[str]:
    """The results as lines: per ratio, the three arms' validation bits per byte, the hard prune's change, and
    GSM's kept weights by kind."""
    lines = [f"prunable weights: {results['prunable']} of {results['parameters']} parameters"
             f"{' (embeddings included)' if results['prune_embeddings'] else ' (embeddings and norms dense)'}",
             f"dense model: {results['dense']['bpb']:.4f} bits per byte"]
    for ratio, arms in results["ratios"].items():
        g, m = arms["gsm"], arms["magnitude"]
        lines.append(f"{ratio}x: GSM {g['bpb']:.4f} bpb after the hard prune ({g['before_prune_bpb']:.4f} before, "
                     f"{g['bpb'] - g['before_prune_bpb']:+.4f}); magnitude + fine-tune {m['bpb']:.4f}; "
                     f"kept {g['kept']} and {m['kept']}")
        kinds = ", ".join(f"{kind} {kept}/{of}" for kind, (kept, of) in g["kept_by_kind"].items())
        lines.append(f"  GSM keeps: {kinds}")
    return lines


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.4f} +- {std:.4f}"


def summary(runs: Sequence[dict]) -> List[str]:
    """A markdown table over several runs (seeds): per ratio, each arm's validation bits per byte as mean +- std,
    and the hard prune's change."""
    lines = [f"{len(runs)} seed(s): {', '.join(str(r['seed']) for r in runs)}", "",
             "| compression | dense | GSM, hard-pruned | GSM before the prune | prune change | magnitude + fine-tune |",
             "| --- | --- | --- | --- | --- | --- |"]
    ratios = [r for r in runs[0]["ratios"] if all(r in run["ratios"] for run in runs)]
    for ratio in ratios:
        arms = [run["ratios"][ratio] for run in runs]
        lines.append(f"| {ratio}x | {_mean_std([run['dense']['bpb'] for run in runs])} "
                     f"| {_mean_std([a['gsm']['bpb'] for a in arms])} "
                     f"| {_mean_std([a['gsm']['before_prune_bpb'] for a in arms])} "
                     f"| {_mean_std([a['gsm']['bpb'] - a['gsm']['before_prune_bpb'] for a in arms])} "
                     f"| {_mean_std([a['magnitude']['bpb'] for a in arms])} |")
    return lines


def plot(runs: Sequence[dict], path: Path) -> None:
    """Validation bits per byte against training steps (the dense model, then each arm from it, at the first
    ratio; means over the runs), and, with several ratios, the final figures against compression."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_curve(curves: Sequence[Sequence[Tuple[int, float]]], offset: int = 0) -> Tuple[list, list]:
        return ([step + offset for step, _ in curves[0]],
                [sum(c[i][1] for c in curves) / len(curves) for i in range(len(curves[0]))])

    ratios = list(runs[0]["ratios"])
    fig, axes = plt.subplots(1, 2 if len(ratios) > 1 else 1, figsize=(12.8 if len(ratios) > 1 else 6.4, 4.6),
                             squeeze=False)
    ax = axes[0][0]
    dense_steps = runs[0]["config"]["dense_steps"]
    ax.plot(*mean_curve([r["dense"]["curve"] for r in runs]), color="black", label="dense (AdamW)")
    ax.axhline(sum(r["dense"]["bpb"] for r in runs) / len(runs), color="black", linestyle=":", linewidth=0.8)
    first = ratios[0]
    for arm, colour, label in (("gsm", "tab:blue", f"GSM {first}x (before the prune)"),
                               ("magnitude", "tab:orange", f"magnitude {first}x + fine-tune")):
        ax.plot(*mean_curve([r["ratios"][first][arm]["curve"] for r in runs], dense_steps), color=colour,
                label=label)
    pruned = sum(r["ratios"][first]["gsm"]["bpb"] for r in runs) / len(runs)
    ax.plot([dense_steps + runs[0]["config"]["prune_steps"]], [pruned], marker="*", markersize=12,
            color="tab:blue", linestyle="none", label=f"GSM {first}x, hard-pruned")
    finals = [pruned] + [sum(r["dense"]["bpb"] for r in runs) / len(runs)]
    ax.set_ylim(min(finals) - 0.3, max(finals) + 1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(f"byte-level transformer, {len(runs)} seed(s)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    if len(ratios) > 1:
        ax = axes[0][1]
        xs = [float(r) for r in ratios]
        for arm, key, label in (("gsm", "bpb", "GSM, hard-pruned"), ("magnitude", "bpb", "magnitude + fine-tune")):
            ax.plot(xs, [sum(r["ratios"][ratio][arm][key] for r in runs) / len(runs) for ratio in ratios],
                    marker="o", label=label)
        ax.axhline(sum(r["dense"]["bpb"] for r in runs) / len(runs), color="black", linestyle="--",
                   linewidth=0.8, label="dense")
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}x" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("compression of the attention and MLP weights")
        ax.set_ylabel("validation bits per byte")
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ratios", nargs="*", type=float, default=[10.0],
                        help="compression ratios R > 1 of the prunable weights (default: 10)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the step counts (a smoke run: 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches")
    parser.add_argument("--out-root", default=".", help="folder under which transformer_exps/ is written")
    parser.add_argument("--corpus", help="folder of .py files (default: this Python's standard library)")
    parser.add_argument("--prune-embeddings", action="store_true",
                        help="rank the token and position embeddings too (the token embedding is the tied output)")
    parser.add_argument("--width", type=int, default=Config.width, help="model width (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=Config.depth, help="transformer blocks (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--summarize", nargs="+", metavar="ROOT",
                        help="train nothing: print the table over the results.json of these --out-roots (seeds)")
    parser.add_argument("--plot", metavar="FILE.png", help="with --summarize: also draw the curves into FILE")
    args = parser.parse_args(argv)
    if args.summarize:
        runs = []
        for root in args.summarize:
            path = Path(root) / "transformer_exps" / "results.json"
            if not path.exists():
                parser.error(f"{path}: no results; run the experiment with --out-root {root} first")
            runs.append(json.loads(path.read_text()))
        print("\n".join(summary(runs)))
        if args.plot:
            plot(runs, Path(args.plot))
            print(f"plot written to {args.plot}")
        return 0
    if not all(ratio > 1 for ratio in args.ratios) or not args.scale > 0:
        parser.error("every ratio must be > 1 and --scale > 0")
    if args.depth < 1 or args.width < Config.heads or args.width % Config.heads:
        parser.error(f"--depth must be >= 1 and --width a multiple of the {Config.heads} heads")
    if args.threads:
        torch.set_num_threads(args.threads)
    gsm.flush_denormals()
    corpus = read_corpus(args.corpus)
    print(f"Python {sys.version.split()[0]}; corpus {corpus.root}: {corpus.train_files} training files "
          f"({corpus.train.numel():,} bytes), {corpus.validation_files} validation files "
          f"({corpus.validation.numel():,} bytes)")
    defaults = Config()
    config = Config(**{**asdict(defaults),
                       "width": args.width, "depth": args.depth,
                       "dense_steps": max(1, round(defaults.dense_steps * args.scale)),
                       "prune_steps": max(1, round(defaults.prune_steps * args.scale)),
                       "evaluate_every": max(1, round(defaults.evaluate_every * min(1.0, args.scale * 4)))})
    results = run(config, args.ratios, args.seed, Path(args.out_root), args.prune_embeddings,
                  not args.no_progress, corpus)
    print("\n".join(report(results)))
    print(f"{results['seconds']:.0f} s; results in {Path(args.out_root) / 'transformer_exps' / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
