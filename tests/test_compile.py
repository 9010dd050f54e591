"""GSM's step under torch.compile(fullgraph=True): it traces whole (the generic path; the host kernels stay
eager), the selection finds what the eager one finds bit for bit, and the compiled update follows the eager one
to float rounding (Inductor fuses the update into one kernel, whose multiply-adds round differently from the
eager multi-tensor operations)."""
import torch
from torch import nn

from gsm import GSM
from gsm.selection import GlobalSelection


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 20), nn.ReLU(),
                         nn.Linear(20, 4))


def test_compiled_selection_equals_eager_bit_for_bit():
    torch._dynamo.reset()
    model = _model(0)
    params = [p.detach() for p in model.parameters() if p.dim() > 1]
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    grads[1][:, ::3] = 0.0  # ties at zero
    k = sum(p.numel() for p in params) // 10
    compiled = torch.compile(lambda: GlobalSelection().masked(params, grads, k), fullgraph=True)()
    eager = GlobalSelection().masked(params, grads, k)
    assert compiled.threshold.item() == eager.threshold.item()
    assert compiled.num_active == eager.num_active >= k
    for a, b in zip(compiled.masked_grads, eager.masked_grads):
        assert torch.equal(a, b)


def test_compiled_step_traces_whole_and_follows_the_eager_step():
    torch._dynamo.reset()
    compiled_model, eager_model = _model(2), _model(2)
    settings = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True, nonzero_ratio=0.1)
    compiled_opt = GSM(compiled_model.parameters(), **settings)  # fused left unset: the trace takes the generic path
    eager_opt = GSM(eager_model.parameters(), fused=False, **settings)
    step = torch.compile(compiled_opt.step, fullgraph=True)
    generator = torch.Generator().manual_seed(3)
    for index in range(5):
        x = torch.randn(8, 3, 6, 6, generator=generator)
        for model in (compiled_model, eager_model):
            model.zero_grad()
            model(x).square().mean().backward()
        step()
        eager_opt.step()
        assert compiled_opt.last_step_fused is False and compiled_opt.num_active >= compiled_opt.keep_count
        if index == 0:  # the same weights and gradients: the same threshold and the same active elements
            assert compiled_opt.last_threshold.item() == eager_opt.last_threshold.item()
            assert compiled_opt.num_active == eager_opt.num_active
        for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # Eager, the same optimizer goes back to the host kernels.
    compiled_opt.step()
    assert compiled_opt.last_step_fused is True
