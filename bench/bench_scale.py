"""GSM against SGD at the sizes users prune today: the optimizer step alone and a whole training iteration, from
1M to 100M weights on the CPU (to 1B on a GPU), at nonzero ratios 1/10 and 1/100.

    python bench/bench_scale.py                                   # CPU: 1M 5M 25M 100M
    python bench/bench_scale.py --sizes 1e6 5e6 --rounds 5
    python bench/bench_scale.py --device cuda --sizes 25e6 1e8 1e9
    python bench/bench_scale.py --gsm-path generic                # GSM(fused=False): no compiled kernels
    python bench/bench_scale.py --gsm-path compiled               # torch.compile(step, fullgraph=True)

The parameters are shaped like a transformer's: `--layers` blocks (10 by default, so 40 matrices) of an
attention input (3d x d) and output (d x d) and an MLP (4d x d, d x 4d), d chosen for the size. The gradients
change every step (two sets alternate, copied in before each step, outside the timed region), as they do in
training; the step of every optimizer is timed in turn, round after round (interleaved, so that a machine
that speeds up or slows down affects all alike), and the medians are printed with GSM / SGD. SGD is
torch.optim.SGD with foreach, and with fused where torch supports it on the device. The iteration is a forward
through the blocks (a batch of --tokens rows), cross-entropy against random classes, backward and the step.
GSM's extra memory is what it holds beyond SGD's momentum buffers (its selection's buffers; on a CUDA device
the peak allocated memory of a step over SGD's).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bench_pipeline import cpu_model  # this folder's scripts import each other when run from it
from gsm import GSM

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


class Blocks(nn.Module):
    """`layers` blocks of qkv (d -> 3d, the first d of it kept), proj (d -> d), fc (d -> 4d), GELU, out (4d -> d),
    each with a residual: the parameter shapes of a transformer's matrices, with a real forward and backward."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "qkv": nn.Linear(width, 3 * width, bias=False), "proj": nn.Linear(width, width, bias=False),
            "fc": nn.Linear(width, 4 * width, bias=False), "out": nn.Linear(4 * width, width, bias=False)})
            for _ in range(layers))
        for p in self.parameters():
            nn.init.normal_(p, std=0.5 / math.sqrt(p.shape[1]))

    def forward(self, x: Tensor) -> Tensor:
        width = x.shape[1]
        for block in self.blocks:
            x = x + block["proj"](block["qkv"](x)[:, :width])
            x = x + block["out"](F.gelu(block["fc"](x)))
        return x


def width_for(size: float, layers: int) -> int:
    """The width d whose `layers` blocks (12 d^2 weights each) come nearest to `size` weights."""
    return max(8, round(math.sqrt(size / (12 * layers))))


def optimizers(model: nn.Module, ratio: float, device: torch.device, gsm_path: str) -> Dict[str, Callable]:
    """{name: factory} of the optimizers to compare: SGD foreach, SGD fused where supported, and GSM."""
    params = list(model.parameters())
    common = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    made = {"SGD foreach": lambda: torch.optim.SGD(params, foreach=True, **common)}
    try:
        torch.optim.SGD(params, fused=True, **common)
        made["SGD fused"] = lambda: torch.optim.SGD(params, fused=True, **common)
    except (RuntimeError, ValueError):
        pass
    fused = {"auto": None, "generic": False, "kernels": True, "compiled": None}[gsm_path]
    made["GSM"] = lambda: GSM(params, nonzero_ratio=ratio, fused=fused, **common)
    return made


class CompiledStep:
    """An optimizer whose `step` is torch.compile(optimizer.step, fullgraph=True), for GSM; `inner` is the
    optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        torch._dynamo.reset()  # the step of an earlier optimizer is compiled code that guards on that optimizer
        self.inner = optimizer
        self.step = torch.compile(optimizer.step, fullgraph=True)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def held_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors and arrays an optimizer holds beyond its momentum buffers (GSM's selection buffers)."""
    selection = getattr(optimizer, "_selection", None)
    return 0 if selection is None else _bytes_in(selection)


def _bytes_in(holder: object) -> int:
    """Bytes of the tensors and arrays among the attributes of `holder` and of the gsm objects it holds (the
    host search's candidates)."""
    total = 0
    for value in vars(holder).values():
        if isinstance(value, Tensor):
            total += value.numel() * value.element_size()
        elif hasattr(value, "nbytes"):
            total += int(value.nbytes)
        elif type(value).__module__.startswith("gsm.") and hasattr(value, "__dict__"):
            total += _bytes_in(value)
    return total


def measure(size: float, ratio: float, args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    """Median step and iteration times (seconds) per optimizer, and GSM's extra bytes."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    width = width_for(size, args.layers)
    model = Blocks(width, args.layers).to(device)
    inputs = torch.randn(args.tokens, width, device=device)
    targets = torch.randint(0, width, (args.tokens,), device=device)
    params = list(model.parameters())
    gradient_sets = [[torch.randn_like(p) * 1e-3 for p in params] for _ in range(2)]
    made = {name: factory() for name, factory in optimizers(model, ratio, device, args.gsm_path).items()}
    if args.gsm_path == "compiled":
        made["GSM eager"] = optimizers(model, ratio, device, "generic")["GSM"]()
        made["GSM"] = CompiledStep(made["GSM"])
    start = [p.detach().clone() for p in params]
    for name, optimizer in made.items():  # warm steps, from the same weights: buffers made (and steps compiled)
        for warm in range(2):
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
            for p, g in zip(params, gradient_sets[warm]):
                p.grad = g.clone()
            optimizer.step()
    times: Dict[str, Dict[str, List[float]]] = {name: {"step": [], "iteration": []} for name in made}
    peak: Dict[str, int] = {}
    for round_index in range(args.rounds):
        for name, optimizer in made.items():
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
            for p, g in zip(params, gradient_sets[round_index % 2]):
                p.grad.copy_(g)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            sync(device)
            began = time.perf_counter()
            optimizer.step()
            sync(device)
            times[name]["step"].append(time.perf_counter() - began)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated(device) - base)
            if args.no_iteration:
                continue
            sync(device)
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=False)
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            sync(device)
            times[name]["iteration"].append(time.perf_counter() - began)
    result = {name: {kind: statistics.median(values) for kind, values in kinds.items() if values}
              for name, kinds in times.items()}
    gsm = made["GSM"].inner if isinstance(made["GSM"], CompiledStep) else made["GSM"]
    result["GSM"]["held_bytes"] = held_bytes(gsm)
    result["GSM"]["active"] = gsm.num_active
    result["GSM"]["kernels"] = bool(gsm.last_step_fused)
    for name, value in peak.items():
        result[name]["peak_bytes"] = value
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 5e6, 25e6, 1e8],
                        help="weights per model (default: 1M 5M 25M 100M)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.01], help="nonzero ratios")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=10, help="blocks of four matrices (default: 10)")
    parser.add_argument("--tokens", type=int, default=64, help="rows of a batch for the iteration (default: 64)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; medians are printed")
    parser.add_argument("--gsm-path", choices=("auto", "generic", "kernels", "compiled"), default="auto",
                        help="auto: the kernels where they apply; generic: GSM(fused=False); kernels: fused=True; "
                             "compiled: torch.compile(step, fullgraph=True), also timed against the eager generic "
                             "step")
    parser.add_argument("--no-iteration", action="store_true", help="time the optimizer step alone")
    args = parser.parse_args()
    print(f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, device {args.device}, GSM path {args.gsm_path}")
    for size in args.sizes:
        for ratio in args.ratios:
            r = measure(size, ratio, args)
            sgd = r["SGD foreach"]
            line = [f"N={size / 1e6:g}M ratio=1/{round(1 / ratio)}",
                    f"step: SGD {sgd['step'] * 1e3:.2f} ms, GSM {r['GSM']['step'] * 1e3:.2f} ms, "
                    f"GSM/SGD {r['GSM']['step'] / sgd['step']:.2f}"]
            if "SGD fused" in r:
                line.append(f"GSM/SGD fused {r['GSM']['step'] / r['SGD fused']['step']:.2f}")
            if "GSM eager" in r:
                line.append(f"compiled / eager GSM {r['GSM']['step'] / r['GSM eager']['step']:.2f} "
                            f"({r['GSM eager']['step'] * 1e3:.2f} ms eager)")
            if "iteration" in sgd:
                line.append(f"iteration: GSM/SGD {r['GSM']['iteration'] / sgd['iteration']:.2f} "
                            f"({sgd['iteration'] * 1e3:.1f} ms SGD)")
            line.append(f"GSM holds {r['GSM']['held_bytes'] / 2 ** 20:.1f} MiB beyond SGD "
                        f"({'kernels' if r['GSM']['kernels'] else 'generic path'})")
            if "peak_bytes" in r["GSM"]:
                line.append(f"peak GSM - SGD {(r['GSM']['peak_bytes'] - sgd['peak_bytes']) / 2 ** 20:.1f} MiB")
            print("; ".join(line), flush=True)


if __name__ == "__main__":
    main()
