"""Data-flow semantics of ALGORITHM.md: accumulation, eval passes, checkpointing, fallbacks."""

from __future__ import annotations

import copy
import gc
import io
import warnings

import pytest
import torch
from conftest import enable_checkpointing
from torch import nn

from hf_slnb import SLNB

torch.set_default_dtype(torch.float64)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 4, bias=False))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _data(step: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 6, generator=g), torch.randn(n, 4, generator=g)


def _train(model: nn.Module, opt: SLNB, steps: int, micro: int = 1, start: int = 0) -> None:
    for s in range(start, start + steps):
        x, y = _data(s)
        for xc, yc in zip(x.chunk(micro), y.chunk(micro)):
            (((model(xc) - yc) ** 2).mean() / micro).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("backend", ["explicit", "matrix_free"])
def test_gradient_accumulation_equals_one_batch(backend: str) -> None:
    a, b = _mlp(), _mlp()
    oa = SLNB(a.parameters(), model=a, metric_backend=backend, diagonal_only=False)
    ob = SLNB(b.parameters(), model=b, metric_backend=backend, diagonal_only=False)
    _train(a, oa, 6, micro=1)
    _train(b, ob, 6, micro=3)
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-11, atol=1e-12)


def test_backends_agree() -> None:
    a, b = _mlp(), _mlp()
    oa = SLNB(a.parameters(), model=a, metric_backend="explicit", cg_iters=3, diagonal_only=False)
    ob = SLNB(b.parameters(), model=b, metric_backend="matrix_free", cg_iters=3,
              diagonal_only=False)
    _train(a, oa, 8)
    _train(b, ob, 8)
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-11, atol=1e-12)
    assert all(n.capture is None for n in oa.neurons + ob.neurons)


def test_eval_and_no_grad_forwards_do_not_count() -> None:
    a, b = _mlp(), _mlp()
    oa, ob = SLNB(a.parameters(), model=a), SLNB(b.parameters(), model=b)
    for s in range(5):
        x, y = _data(s)
        noise = torch.randn(50, 6) * 7 + 3
        with torch.no_grad():
            b(noise)
        b.eval()
        b(noise).sum()  # grad enabled but eval mode: not a training input
        b.train()
        b(noise)  # training mode, grad enabled, but never back-propagated
        for m, o in ((a, oa), (b, ob)):
            ((m(x) - y) ** 2).mean().backward()
            o.step()
            o.zero_grad()
    torch.testing.assert_close(_flat(a), _flat(b), rtol=0, atol=0)


def _tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).double()


@pytest.mark.parametrize("options", [{"preset": "graft", "diagonal_only": False},
                                     # every step captures, whatever the preset's cov_every
                                     {"preset": "whitened", "whiten_every": 2, "cov_every": 1}],
                         ids=["graft_pcg", "whitened"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_counts_once(reentrant: bool, options: dict) -> None:
    a, b = _tiny_gpt2(), _tiny_gpt2()
    enable_checkpointing(b, use_reentrant=reentrant)
    a.train()
    b.train()
    oa = SLNB(a.parameters(), model=a, **options)
    ob = SLNB(b.parameters(), model=b, **options)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        ids = torch.randint(0, 40, (3, 12), generator=g)
        counts = []
        for m, o in ((a, oa), (b, ob)):
            m(input_ids=ids, labels=ids).loss.backward()
            counts.append({n.name: float(n.capture.count) for n in o.neurons
                           if n.capture is not None})
            o.step()
            o.zero_grad()
        assert counts[0] == counts[1]
        # whitened: the embeddings and the head take Adam's step, and capture nothing
        heads = {"transformer.wpe", "lm_head"}
        assert heads <= set(counts[1]) if options["preset"] == "graft" else not heads & set(
            counts[1])
        assert len(counts[1]) >= 8  # the 4 Conv1D layers of each of the 2 blocks
        # 3 x 12 token positions, once each (the position embedding sees its 12 positions)
        assert counts[1].pop("transformer.wpe", 12.0) == 12.0
        assert set(counts[1].values()) == {36.0}
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-10, atol=1e-12)


def test_tied_embedding_uses_the_head_metric() -> None:
    m = _tiny_gpt2()
    opt = SLNB(m.parameters(), model=m)
    names = {n.name: n.kind for n in opt.neurons}
    assert names["lm_head"] == "linear"
    assert "transformer.wte" not in names
    assert names["transformer.wpe"] == "embedding"
    assert names["transformer.h.0.attn.c_attn"] == "conv1d_hf"
    off = SLNB(m.parameters(), model=m, precondition_embeddings=False, skip_modules=[r"\.mlp\."])
    kinds = {n.name for n in off.neurons}
    assert "transformer.wpe" not in kinds and not any(".mlp." in k for k in kinds)


def test_neuron_without_input_falls_back_to_identity() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(3, 2)
    other = nn.Linear(3, 3)
    model = nn.ModuleDict({"lin": lin, "other": other})
    opt = SLNB(model.parameters(), model=model, preset="paper", momentum=0.0, weight_decay=0.0,
               lr=0.5)
    x = torch.randn(10, 3)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    # `lin` is used functionally: it gets gradients but its forward hook never fires.
    loss = torch.nn.functional.linear(other(x), torch.cat([lin.weight] * 1, 0)[:, :3]).sum()
    loss = loss + lin.bias.sum()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    # Identity metric for lin: its h is its gradient; other's h solves its metric.
    h_other = [opt.state[p]["solution"] for p in (other.weight, other.bias)]
    inner = sum((grads[f"lin.{k}"] ** 2).sum() for k in ("weight", "bias"))
    inner = inner + sum((h * grads[f"other.{k}"]).sum() for h, k in zip(h_other, ("weight", "bias")))
    n = inner.sqrt()
    for k in ("weight", "bias"):
        expected = before[f"lin.{k}"] - 0.5 * grads[f"lin.{k}"] / n
        torch.testing.assert_close(getattr(lin, k).detach(), expected, rtol=1e-12, atol=1e-14)
    assert "mu" not in opt.state[lin.weight]


def test_parameter_without_gradient_is_skipped() -> None:
    m = _mlp()
    frozen = m[3].weight
    opt = SLNB(m.parameters(), model=m)
    before = frozen.detach().clone()
    x, y = _data(0)
    frozen.requires_grad_(False)
    ((m(x) - y) ** 2).mean().backward()
    opt.step()
    assert torch.equal(frozen, before) and len(opt.state[frozen]) == 0
    assert "momentum_buffer" in opt.state[m[0].weight]


def test_bf16_autocast_keeps_float32_statistics() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).float()
    ref = copy.deepcopy(m)
    opt = SLNB(m.parameters(), model=m)
    opt_ref = SLNB(ref.parameters(), model=ref)
    x = torch.randn(64, 8, dtype=torch.float32)
    for model, o, amp in ((m, opt, True), (ref, opt_ref, False)):
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = model(x).float().pow(2).mean()
            loss.backward()
            o.step()
            o.zero_grad()
    for p in m.parameters():
        for key, v in opt.state[p].items():
            if key not in ("step", "stat_step"):
                assert v.dtype == torch.float32, key
    torch.testing.assert_close(opt.state[m[2].weight]["nu"], opt_ref.state[ref[2].weight]["nu"],
                               rtol=3e-2, atol=1e-3)


def test_bf16_parameters_keep_float32_state_across_checkpoint() -> None:
    torch.manual_seed(0)
    m = nn.Linear(4, 3).to(torch.bfloat16)
    opt = SLNB(m.parameters(), model=m, diagonal_only=False)
    m(torch.randn(5, 4, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    m2 = copy.deepcopy(m)
    opt2 = SLNB(m2.parameters(), model=m2, diagonal_only=False)
    opt2.load_state_dict(sd)
    for key in ("momentum_buffer", "mu", "nu", "solution", "exp_avg_sq"):
        assert opt2.state[m2.weight][key].dtype == torch.float32
        assert torch.equal(opt2.state[m2.weight][key], opt.state[m.weight][key])


def _save_load(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("preset", ["graft", "paper", "whitened"])
def test_checkpoint_resume_is_bit_exact(preset: str) -> None:
    torch.set_default_dtype(torch.float32)
    try:
        a = _mlp().float()
        oa = SLNB(a.parameters(), model=a, preset=preset)
        _train_f32(a, oa, 20)
        b = _mlp().float()
        ob = SLNB(b.parameters(), model=b, preset=preset)
        _train_f32(b, ob, 13)  # not a multiple of the whitening's refresh interval (10)
        model_sd, opt_sd = _save_load(b.state_dict()), _save_load(ob.state_dict())
        c = _mlp(seed=5).float()
        oc = SLNB(c.parameters(), model=c, preset=preset)
        c.load_state_dict(model_sd)
        oc.load_state_dict(opt_sd)
        _train_f32(c, oc, 7, start=13)
        assert torch.equal(_flat(a), _flat(c))
    finally:
        torch.set_default_dtype(torch.float64)


def _train_f32(model: nn.Module, opt: SLNB, steps: int, start: int = 0) -> None:
    for s in range(start, start + steps):
        x, y = _data(s)
        ((model(x.float()) - y.float()) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_state_dict_round_trip_before_first_step() -> None:
    a, b = _mlp(), _mlp()
    oa, ob = SLNB(a.parameters(), model=a), SLNB(b.parameters(), model=b)
    ob.load_state_dict(ob.state_dict())  # what Accelerate does at prepare time
    _train(a, oa, 3)
    _train(b, ob, 3)
    assert torch.equal(_flat(a), _flat(b))


def test_no_memory_growth_over_1000_steps() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = SLNB(m.parameters(), model=m, metric_backend="matrix_free", diagonal_only=False)
    x = torch.randn(16, 4)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter))

    counts = []
    for step in range(1000):
        m(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step in (20, 999):
            counts.append(live_tensors())
            assert all(n.capture is None for n in opt.neurons)
    assert counts[1] <= counts[0]
    state_numel = sum(v.numel() for s in opt.state.values() for v in s.values())
    n_params = sum(p.numel() for p in m.parameters())
    # momentum, solution and Adam's second moment (graft) per element, a step per tensor,
    # mu/nu per feature, a count per layer
    assert state_numel == 3 * n_params + 4 + 2 * (4 + 8) + 2
    assert opt.trust_region == "graft_row" and not opt.diagonal_only


def test_nonfinite_gradient_skips_the_step_and_names_the_parameter() -> None:
    m = _mlp()
    opt = SLNB(m.parameters(), model=m)
    _train(m, opt, 2)
    before = _flat(m).clone()
    state = copy.deepcopy(opt.state_dict())
    x, y = _data(7)
    ((m(x) - y) ** 2).mean().backward()
    m[2].weight.grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"2\.weight"):
        opt.step()
    assert torch.equal(_flat(m), before)
    after = opt.state_dict()
    for k, s in state["state"].items():
        for key, v in s.items():
            assert torch.equal(v, after["state"][k][key])
    assert opt.diagnostics()["slnb/skipped_steps"] == 1.0


@pytest.mark.parametrize("preset", ["graft", "whitened"])
def test_nonfinite_input_skips_the_step(preset: str) -> None:
    m = _mlp()
    opt = SLNB(m.parameters(), model=m, preset=preset)
    x, y = _data(0)
    x[0, 0] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = m(x)
        ((torch.nan_to_num(out) - y) ** 2).mean().backward()
        opt.step()
    assert any("inputs of 0" in str(w.message) for w in caught)
    # The skip is a device mask: state made by the skipped step holds a fresh optimizer's values
    # (zeros, and the whitened preset's inverse roots the identity: a refresh of a covariance
    # that has seen no input must not give 1/sqrt of the eigenvalue floor, 1e154 here).
    for s in opt.state.values():
        for key, v in s.items():
            if key == "input_inv_sqrt":
                assert torch.equal(v, torch.eye(v.shape[-1], dtype=v.dtype).expand_as(v)), key
            else:
                assert not torch.is_tensor(v) or not v.any(), (key, v)
    assert any("input_inv_sqrt" in s for s in opt.state.values()) == (preset == "whitened")


def test_lora_hooks_only_adapters() -> None:
    peft = pytest.importorskip("peft")
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    base = BertForSequenceClassification(cfg)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SLNB(params, model=model)
    names = [n.name for n in opt.neurons]
    assert names and all("lora_" in n or "classifier" in n for n in names), names
    ids = torch.randint(0, 50, (4, 10))
    model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    before = [p.detach().clone() for p in params]
    opt.step()
    changed = [not torch.equal(p, q) for p, q in zip(params, before)]
    # lora_B starts at zero with a zero gradient for lora_A: all but those move
    assert sum(changed) >= len(params) // 2


def test_conv_layers_are_neurons_and_transposed_conv_is_not() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect"),
                      nn.ConvTranspose2d(4, 2, 2), nn.Conv3d(2, 2, 1, bias=False))
    opt = SLNB(m.parameters(), model=m)
    assert [n.name for n in opt.neurons] == ["0", "2", "4"]
    for _ in range(3):
        y = m[:4](torch.randn(2, 2, 9, 9))
        y.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert "mu" in opt.state[m[2].weight] and "mu" not in opt.state[m[3].weight]


def test_blocked_gram_of_wide_layers_matches_matrix_free() -> None:
    torch.manual_seed(0)
    a = nn.Linear(600, 3)
    b = copy.deepcopy(a)
    oa = SLNB(a.parameters(), model=a, metric_backend="explicit", cg_iters=3, diagonal_only=False)
    ob = SLNB(b.parameters(), model=b, metric_backend="matrix_free", cg_iters=3,
              diagonal_only=False)
    for _ in range(3):
        x = torch.randn(50, 600) + torch.linspace(-1, 1, 600)
        for m, o in ((a, oa), (b, ob)):
            m(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-11, atol=1e-12)
