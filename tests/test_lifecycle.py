"""The life cycle of SLNB's capture hooks: ownership, freeing, copies, skipped steps, backends.

Every test compares against an independent run (bit for bit where the maths is the same) or
checks a fact that the defects of issue 11 violated (a weak reference that must die, a hook
count, a warning that must be given once).
"""

from __future__ import annotations

import copy
import gc
import io
import pickle
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from hf_slnb import SLNB

DT = torch.float64


def _mlp(seed: int = 0, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.LayerNorm(width),
                         nn.Linear(width, 4)).to(DT)


def _data(step: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 6, generator=g, dtype=DT), torch.randn(n, 4, generator=g, dtype=DT)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _state(opt: SLNB) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def _forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _train(model: nn.Module, opt: SLNB, steps: range) -> None:
    for s in steps:
        _loss(model, *_data(s)).backward()
        opt.step()
        opt.zero_grad()


# ---------------------------------------------------------------------------------------------
# Item 2: hooks hold the optimizer weakly; one optimizer per module
# ---------------------------------------------------------------------------------------------
def test_discarded_optimizer_is_freed_and_its_hooks_removed() -> None:
    model = _mlp()
    opt = SLNB(model.parameters(), model=model, preset="paper")
    _train(model, opt, range(2))
    assert _forward_hooks(model) == 2
    alive = weakref.ref(opt)
    del opt
    gc.collect()
    assert alive() is None, "a discarded SLNB must be freed (the hooks must not hold it)"
    assert _forward_hooks(model) == 0
    # A new optimizer on the same model: one hook per layer, and it trains like a fresh one.
    fresh = _mlp()
    fresh.load_state_dict(model.state_dict())
    a = SLNB(model.parameters(), model=model, preset="paper")
    b = SLNB(fresh.parameters(), model=fresh, preset="paper")
    assert _forward_hooks(model) == 2
    _train(model, a, range(3))
    _train(fresh, b, range(3))
    assert torch.equal(_flat(model), _flat(fresh))


def test_second_optimizer_on_a_model_takes_over_the_hooks() -> None:
    model = _mlp()
    first = SLNB(model.parameters(), model=model, preset="paper")
    with pytest.warns(UserWarning, match="hooked by an earlier SLNB optimizer"):
        second = SLNB(model.parameters(), model=model, preset="paper")
    assert _forward_hooks(model) == 2
    _loss(model, *_data(0)).backward()
    assert all(n.capture is None for n in first.neurons)
    assert all(n.capture is not None for n in second.neurons)
    with pytest.raises(RuntimeError, match="took over this one's hooks"):
        first.step()
    second.step()


def test_optimizers_on_disjoint_layers_of_one_model_coexist() -> None:
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = SLNB(model[0].parameters(), model=model, preset="paper")
        b = SLNB(model[3].parameters(), model=model, preset="paper")
    _loss(model, *_data(0)).backward()
    assert [n.name for n in a.neurons if n.capture is not None] == ["0"]
    assert [n.name for n in b.neurons if n.capture is not None] == ["3"]
    a.step()
    b.step()


# ---------------------------------------------------------------------------------------------
# Item 3: nothing of SLNB outlives the backward pass it served
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["graft", "paper"])
def test_kept_losses_keep_no_captured_input(preset: str) -> None:
    model = _mlp(width=32)
    opt = SLNB(model.parameters(), model=model, preset=preset, metric_backend="matrix_free")
    seen: list[StorageWeakRef] = []  # SLNB may hold aliases (detach()): watch the memory
    model[3].register_forward_hook(lambda m, a, o: seen.append(StorageWeakRef(a[0].untyped_storage())))
    losses = []
    for s in range(4):
        x, y = _data(s)
        loss = _loss(model, x, y)
        loss.backward()
        losses.append(loss)  # a user's loss history, graph and all
        opt.step()
        opt.zero_grad()
    del loss
    gc.collect()
    assert len(seen) == 4
    assert all(r.expired() for r in seen), "a kept loss keeps SLNB's captured inputs alive"


# ---------------------------------------------------------------------------------------------
# Item 4: zero_grad() without step() drops the captures
# ---------------------------------------------------------------------------------------------
def _zero(how: str, model: nn.Module, opt: SLNB) -> None:
    if how == "opt":
        opt.zero_grad()
    elif how == "opt_zeros":
        opt.zero_grad(set_to_none=False)
    else:  # what the HF Trainer calls
        model.zero_grad()


@pytest.mark.parametrize("how", ["opt", "opt_zeros", "model"])
@pytest.mark.parametrize("preset", ["graft", "paper"])
def test_zero_grad_without_step_drops_the_captures(how: str, preset: str) -> None:
    a, b = _mlp(), _mlp()
    oa = SLNB(a.parameters(), model=a, preset=preset)
    ob = SLNB(b.parameters(), model=b, preset=preset)
    for s in range(3):
        # a: a discarded batch (backward, zero_grad, no step), then the real one; b: the real one.
        _loss(a, *_data(1000 + s, n=40)).backward()
        _zero(how, a, oa)
        _loss(a, *_data(s)).backward()
        oa.step()
        _zero(how, a, oa)
        _loss(b, *_data(s)).backward()
        ob.step()
        _zero(how, b, ob)
    assert torch.equal(_flat(a), _flat(b))
    assert all(torch.equal(u, v) for u, v in zip(_state(oa), _state(ob)))


@pytest.mark.parametrize("how", ["opt", "model"])
@pytest.mark.parametrize("preset", ["graft", "paper"])
def test_grad_scaler_skipped_step_equals_the_clean_run(how: str, preset: str) -> None:
    runs = []
    for overflow in (True, False):
        model = _mlp()
        opt = SLNB(model.parameters(), model=model, preset=preset)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        skipped = 0
        for s in range(5):
            if s == 2 and not overflow:
                continue  # the clean run never sees the batch that overflows
            loss = _loss(model, *_data(s))
            if s == 2:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            first = next(model.parameters())
            before = float(opt.state[first]["step"]) if opt.state[first] else None
            scaler.step(opt)
            scaler.update()
            skipped += int(before == float(opt.state[first]["step"]))
            _zero(how, model, opt)
        assert skipped == (1 if overflow else 0)
        runs.append((_flat(model), _state(opt)))
    (pa, sa), (pb, sb) = runs
    assert torch.equal(pa, pb)
    assert all(torch.equal(u, v) for u, v in zip(sa, sb))


# ---------------------------------------------------------------------------------------------
# Item 5: copies and pickles
# ---------------------------------------------------------------------------------------------
def test_model_with_hooks_pickles_and_saves() -> None:
    model = _mlp()
    opt = SLNB(model.parameters(), model=model, preset="paper")
    _train(model, opt, range(1))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(model))
    for other in (loaded, unpickled):
        assert torch.equal(_flat(other), _flat(model))
        _loss(other, *_data(0)).backward()  # its inert hooks remove themselves
        assert _forward_hooks(other) == 0
    assert all(n.capture is None for n in opt.neurons)
    assert _forward_hooks(model) == 2
    _train(model, opt, range(1, 2))


def test_deep_copied_model_is_not_wired_to_the_old_optimizer() -> None:
    model = _mlp()
    opt = SLNB(model.parameters(), model=model, preset="paper")
    twin = copy.deepcopy(model)
    _loss(twin, *_data(0)).backward()
    assert all(n.capture is None for n in opt.neurons), "the copy fed the original's captures"
    assert _forward_hooks(twin) == 0
    # The copy trains with its own optimizer exactly like the original with its own.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twin_opt = SLNB(twin.parameters(), model=twin, preset="paper")
    twin.zero_grad()
    _train(model, opt, range(3))
    _train(twin, twin_opt, range(3))
    assert torch.equal(_flat(model), _flat(twin))


@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle", "torch.save"])
def test_copying_the_optimizer_is_a_clear_error(how: str) -> None:
    model = _mlp()
    opt = SLNB(model.parameters(), model=model)
    _train(model, opt, range(1))
    act = {
        "deepcopy": lambda: copy.deepcopy(opt),
        "copy": lambda: copy.copy(opt),
        "pickle": lambda: pickle.dumps(opt),
        "torch.save": lambda: torch.save(opt, io.BytesIO()),
    }[how]
    with pytest.raises(TypeError, match=r"Save opt.state_dict\(\) instead"):
        act()
    _train(model, opt, range(1, 2))  # the optimizer itself is unharmed


# ---------------------------------------------------------------------------------------------
# Item 8: layers used functionally
# ---------------------------------------------------------------------------------------------
def test_functional_layer_is_reported_once() -> None:
    torch.manual_seed(1)
    model = nn.ModuleDict({"lin": nn.Linear(3, 2), "other": nn.Linear(3, 3)}).to(DT)
    opt = SLNB(model.parameters(), model=model, preset="paper")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            x = torch.randn(10, 3, dtype=DT)
            F.linear(model["other"](x), model["lin"].weight, model["lin"].bias).sum().backward()
            opt.step()
            opt.zero_grad()
    said = [str(w.message) for w in caught if "never saw its input" in str(w.message)]
    assert len(said) == 1 and "'lin'" in said[0] and "'other'" not in said[0]


def _tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(DT)


@pytest.mark.parametrize("preset", ["graft", "paper"])
def test_head_used_functionally_gets_the_metric_of_the_module(preset: str) -> None:
    """TRL's fused head: ``F.linear(last_hidden_state, lm_head.weight)`` equals calling it."""
    runs = []
    for functional in (False, True):
        model = _tiny_gpt2()
        opt = SLNB(model.parameters(), model=model, preset=preset)
        g = torch.Generator().manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                ids = torch.randint(0, 40, (3, 12), generator=g)
                hidden = model.transformer(input_ids=ids).last_hidden_state
                if functional:
                    logits = F.linear(hidden, model.lm_head.weight)
                else:
                    logits = model.lm_head(hidden)
                F.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1)).backward()
                opt.step()
                opt.zero_grad()
        runs.append((_flat(model), opt.diagnostics()["slnb/preconditioned_fraction"]))
    assert runs[0][1] > 0.95
    assert runs[1][1] == runs[0][1]
    assert torch.equal(runs[0][0], runs[1][0])




def _hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg)


def _hf_args(tmp_path: Path, cls: type | None = None, **kwargs: Any) -> Any:
    import transformers

    cls = cls or transformers.TrainingArguments
    defaults: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"), "optim": "slnb", "max_steps": 2,
        "per_device_train_batch_size": 4, "logging_steps": 1, "report_to": "none",
        "use_cpu": True, "save_strategy": "no", "disable_tqdm": True, "seed": 0,
    }
    defaults.update(kwargs)
    return cls(**defaults)


def _expected_fraction(model: nn.Module, preset: str = "graft") -> float:
    """Share of parameters that are weights or biases of a linear layer (an independent count:
    everything but the layer norms; the tied head/embedding counts once). With the whitened
    preset, the weights of the Conv1D layers inside the transformer blocks alone
    (its orthogonalised matrices; the rest takes Adam's step)."""
    total = sum(p.numel() for p in model.parameters())
    if preset == "whitened":
        from transformers.pytorch_utils import Conv1D

        return sum(m.weight.numel() for m in model.transformer.h.modules()
                   if isinstance(m, Conv1D)) / total
    norms = sum(p.numel() for m in model.modules() if isinstance(m, nn.LayerNorm)
                for p in m.parameters(recurse=False))
    return (total - norms) / total


def test_trl_sft_trainer_preconditions_the_head(tmp_path: Path, float32_one_thread) -> None:
    trl = pytest.importorskip("trl")
    tokenizers = pytest.importorskip("tokenizers")
    import transformers
    from datasets import Dataset

    import hf_slnb
    from hf_slnb import integration

    hf_slnb.register()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2,
             **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    letters = "abcdefghijklmnopqrstuvwxyz"
    data = Dataset.from_dict({"text": [" ".join(letters[i:i + 8]) for i in range(16)]})
    for preset in ("graft", "paper", "whitened"):
        model = _hf_gpt2()
        args = _hf_args(tmp_path, trl.SFTConfig, max_length=16, optim_args=f"preset={preset}")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data,
                                 processing_class=tokenizer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
        assert not [w for w in caught if "never saw its input" in str(w.message)]
        opt = integration.unwrap_optimizer(trainer.optimizer)
        fraction = opt.diagnostics()["slnb/preconditioned_fraction"]
        assert fraction == pytest.approx(_expected_fraction(model, preset), abs=1e-9), preset
        assert fraction > (0.95 if preset != "whitened" else 0.5)


def test_trainer_rerun_on_one_model_keeps_one_set_of_hooks(tmp_path: Path,
                                                           float32_one_thread) -> None:
    import transformers
    from datasets import Dataset

    import hf_slnb
    from hf_slnb import integration

    hf_slnb.register()
    model = _hf_gpt2()
    g = torch.Generator().manual_seed(0)
    ids = ((torch.randint(0, 64, (16, 1), generator=g) + torch.arange(16)) % 64).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    expected = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # a notebook cell run three times
            transformers.Trainer(model=model, args=_hf_args(tmp_path),
                                 train_dataset=data).train()
            hooks = {name: len(m._forward_hooks) for name, m in model.named_modules()
                     if m._forward_hooks}
            expected = expected or hooks
            assert hooks == expected
    assert hooks["lm_head"] == 1 and hooks["transformer"] == 1
    assert not [w for w in caught if "earlier SLNB" in str(w.message)]
    # The last run trained with a working optimizer (the default preset, whitened, on this
    # GPT-2): every layer of the blocks orthogonalised.
    trainer = transformers.Trainer(model=model, args=_hf_args(tmp_path), train_dataset=data)
    trainer.train()
    fraction = integration.unwrap_optimizer(trainer.optimizer).diagnostics()
    assert fraction["slnb/preconditioned_fraction"] == pytest.approx(
        _expected_fraction(model, "whitened"))


# ---------------------------------------------------------------------------------------------
# Item 9: the auto backend accounts for the whole step's inputs
# ---------------------------------------------------------------------------------------------
def test_auto_backend_folds_many_micro_batches_into_the_explicit_moment() -> None:
    width, micro, rows = 128, 40, 16
    runs = {}
    for backend in ("auto", "explicit", "matrix_free"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)).to(DT)
        opt = SLNB(model.parameters(), model=model, preset="paper", metric_backend=backend)
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            for _ in range(micro):
                x = torch.randn(rows, width, generator=g, dtype=DT)
                (model(x).pow(2).mean() / micro).backward()
            if backend == "auto":
                caps = [n.capture for n in opt.neurons]
                assert all(c.gram is not None for c in caps)
                assert max(len(c.inputs) for c in caps) <= 8  # bounded, not one per micro-batch
            opt.step()
            opt.zero_grad()
        runs[backend] = _flat(model)
    torch.testing.assert_close(runs["auto"], runs["explicit"], rtol=0, atol=1e-10)
    torch.testing.assert_close(runs["auto"], runs["matrix_free"], rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Item 10: matrix-free is exact whatever the caller does with its tensors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_matrix_free_refilled_input_buffer_equals_fresh_tensors(layer: str) -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        if layer == "linear":
            return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
        return nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Conv1d(3, 2, 2)).to(DT)

    shape = (8, 6) if layer == "linear" else (4, 2, 7)
    runs = []
    for refill in (False, True):
        model = build()
        opt = SLNB(model.parameters(), model=model, preset="paper", metric_backend="matrix_free",
                   cg_iters=4)
        g = torch.Generator().manual_seed(2)
        buf = torch.empty(shape, dtype=DT)
        for _ in range(3):
            for _ in range(3):
                x = torch.randn(shape, generator=g, dtype=DT)
                if refill:
                    buf.copy_(x)
                    x = buf
                model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        runs.append(_flat(model))
    assert torch.equal(runs[0], runs[1])


def test_construction_and_add_param_group_warnings_name_the_callers_line() -> None:
    """The warnings given while the optimizer is built (a parametrized layer, hooks taken over
    from an earlier optimizer) name the line that built it, and those of ``add_param_group``
    the line that called it: not a line inside hf_slnb, nor the caller's caller."""
    from torch.nn.utils import parametrizations

    def lines_of(record: list[warnings.WarningMessage]) -> set[tuple[str, int]]:
        return {(Path(w.filename).name, w.lineno) for w in record
                if issubclass(w.category, UserWarning) and "SLNB" in str(w.message)}

    here = Path(__file__).name
    torch.manual_seed(0)
    net = nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 3)), nn.Tanh(), nn.Linear(3, 2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        first = SLNB(net.parameters(), model=net)
    assert lines_of(record) == {(here, line)}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        second = SLNB(net.parameters(), model=net)
    texts = [str(w.message) for w in record]
    assert any("hooked by an earlier SLNB" in t for t in texts), texts
    assert lines_of(record) == {(here, line)}
    first.remove_hooks()
    second.remove_hooks()

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), parametrizations.weight_norm(nn.Linear(3, 2)))
    opt = SLNB(net[0].parameters(), model=net)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        opt.add_param_group({"params": list(net[2].parameters())})
    texts = [str(w.message) for w in record]
    assert any("identity metric to '2'" in t for t in texts), texts
    assert lines_of(record) == {(here, line)}
    opt.remove_hooks()
