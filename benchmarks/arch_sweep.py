"""Does the default SLNB train every kind of Hugging Face model? A sweep over 21 tiny
architectures (decoders, encoder-decoders, encoder classifiers, vision, speech; tied and untied
heads), each built from a config (no download), 60 steps on learnable synthetic data (a Markov
chain's tokens, a copy task, a token-count label, class-dependent images or tones), AdamW
against ``SLNB(model.parameters(), model=model, lr=...)`` with its defaults, over the same lrs
and seeds. Prints, per architecture, the preset SLNB chose, each optimizer's best final train
loss (mean of the last 5 steps) and its lr, SLNB's at AdamW's best lr (a user who keeps the lr
tuned for AdamW), the loss spikes, and every warning or error.

A smoke test of coverage and stability, not a ranking: 60 steps at a constant lr, no warmup,
train loss only. One core (``torch.set_num_threads(1)``); about 6 minutes.

Usage (from the repository root)::

    HF_HUB_OFFLINE=1 python benchmarks/arch_sweep.py [--only gpt_neox,t5] [--seeds 0,1]
        [--lrs 3e-4,1e-3,3e-3,1e-2] [--steps 60] [--slnb-args rest_lr_scale=0.1] [--muon]
"""

from __future__ import annotations

import argparse
import math
import statistics
import traceback
import warnings

import torch
import transformers as tf

from hf_slnb import SLNB

V, L, B, STEPS = 256, 32, 8, 60
H, FF, NL, NH = 64, 128, 2, 4


def markov_table(seed=1234):
    g = torch.Generator().manual_seed(seed)
    succ = torch.stack([torch.randperm(V, generator=g)[:4] for _ in range(V)])  # 4 successors
    probs = torch.tensor([0.55, 0.25, 0.15, 0.05])
    return succ, probs


SUCC, PROBS = markov_table()


def markov_seqs(n, length=L, seed=0, low=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(low, V, (n,), generator=g)
    for t in range(1, length):
        k = torch.multinomial(PROBS.expand(n, 4), 1, generator=g).squeeze(1)
        x[:, t] = SUCC[x[:, t - 1], k]
    return x.clamp_(min=low)  # keep away from special ids 0..3 (pad/bos/eos)


def clm_batches(n_batches, seed=0):
    x = markov_seqs(n_batches * B, seed=seed)
    return [{"input_ids": b, "labels": b.clone()} for b in x.split(B)]


def s2s_batches(n_batches, seed=0):  # copy task: target = source (Markov, so also LM-learnable)
    x = markov_seqs(n_batches * B, seed=seed)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()}
            for b in x.split(B)]


def cls_batches(n_batches, seed=0):  # label = majority of tokens in the lower half of the vocab
    # (sequences drawn 75/25 from one half so the majority is clear; label recomputed from tokens)
    g = torch.Generator().manual_seed(seed)
    n = n_batches * B
    z = torch.randint(0, 2, (n, 1), generator=g)
    lower = (torch.rand(n, L, generator=g) < 0.75) ^ z.bool()
    x = torch.where(lower, torch.randint(4, V // 2, (n, L), generator=g),
                    torch.randint(V // 2, V, (n, L), generator=g))
    y = ((x < V // 2).sum(1) > L // 2).long()
    return [{"input_ids": a, "attention_mask": torch.ones_like(a), "labels": b}
            for a, b in zip(x.split(B), y.split(B))]


def img_batches(n_batches, seed=0, n_cls=10):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_cls, 3, 32, 32, generator=g) * 0.7
    y = torch.randint(0, n_cls, (n_batches * B,), generator=g)
    x = means[y] + torch.randn(n_batches * B, 3, 32, 32, generator=g)
    return [{"pixel_values": a, "labels": b} for a, b in zip(x.split(B), y.split(B))]


def audio_cls_batches(n_batches, seed=0, n_cls=4, samples=800):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_cls, (n_batches * B,), generator=g)
    t = torch.arange(samples) / 16000.0
    freqs = torch.tensor([300.0, 700.0, 1500.0, 3000.0])
    x = torch.sin(2 * math.pi * freqs[y][:, None] * t) + 0.3 * torch.randn(n_batches * B, samples,
                                                                              generator=g)
    return [{"input_values": a, "labels": b} for a, b in zip(x.split(B), y.split(B))]


def whisper_batches(n_batches, seed=0, mels=16, frames=64):
    g = torch.Generator().manual_seed(seed)
    tgt = markov_seqs(n_batches * B, length=16, seed=seed)
    feats = torch.randn(n_batches * B, mels, frames, generator=g)
    return [{"input_features": a, "labels": b} for a, b in zip(feats.split(B), tgt.split(B))]


def dec(cfg_cls, model_cls, **kw):
    return lambda: model_cls(cfg_cls(**kw)), clm_batches


def llama_kw(**extra):
    kw = {"vocab_size": V, "hidden_size": H, "intermediate_size": FF, "num_hidden_layers": NL,
          "num_attention_heads": NH, "num_key_value_heads": 2, "max_position_embeddings": 64}
    kw.update(extra)
    return kw


ARCHS = {
    "gpt_neox": dec(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, vocab_size=V, hidden_size=H,
                    num_hidden_layers=NL, num_attention_heads=NH, intermediate_size=FF,
                    max_position_embeddings=64),
    "opt": dec(tf.OPTConfig, tf.OPTForCausalLM, vocab_size=V, hidden_size=H, num_hidden_layers=NL,
               ffn_dim=FF, num_attention_heads=NH, max_position_embeddings=64,
               word_embed_proj_dim=H),
    "qwen2": dec(tf.Qwen2Config, tf.Qwen2ForCausalLM, **llama_kw()),
    "mistral": dec(tf.MistralConfig, tf.MistralForCausalLM, **llama_kw()),
    "gemma": dec(tf.GemmaConfig, tf.GemmaForCausalLM, **llama_kw(head_dim=16, pad_token_id=0)),
    "gemma2": dec(tf.Gemma2Config, tf.Gemma2ForCausalLM,
                  **llama_kw(head_dim=16, pad_token_id=0, sliding_window=16)),
    "phi": dec(tf.PhiConfig, tf.PhiForCausalLM, vocab_size=V, hidden_size=H,
               intermediate_size=FF, num_hidden_layers=NL, num_attention_heads=NH,
               max_position_embeddings=64),
    "phi3": dec(tf.Phi3Config, tf.Phi3ForCausalLM,
                **llama_kw(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "falcon": dec(tf.FalconConfig, tf.FalconForCausalLM, vocab_size=V, hidden_size=H,
                  num_hidden_layers=NL, num_attention_heads=NH),
    "bloom": dec(tf.BloomConfig, tf.BloomForCausalLM, vocab_size=V, hidden_size=H, n_layer=NL,
                 n_head=NH),
    "gptj": dec(tf.GPTJConfig, tf.GPTJForCausalLM, vocab_size=V, n_embd=H, n_layer=NL, n_head=NH,
                rotary_dim=8, n_positions=64, n_inner=FF, bos_token_id=1, eos_token_id=2),
    "t5": (lambda: tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=V, d_model=H, d_kv=16, d_ff=FF, num_layers=NL, num_decoder_layers=NL,
        num_heads=NH, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)), s2s_batches),
    "bart": (lambda: tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=V, d_model=H, encoder_layers=NL, decoder_layers=NL, encoder_attention_heads=NH,
        decoder_attention_heads=NH, encoder_ffn_dim=FF, decoder_ffn_dim=FF,
        max_position_embeddings=64)), s2s_batches),
    "roberta_cls": (lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=NL, num_attention_heads=NH,
        intermediate_size=FF, max_position_embeddings=64, num_labels=2)), cls_batches),
    "distilbert_cls": (lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        vocab_size=V, dim=H, n_layers=NL, n_heads=NH, hidden_dim=FF, max_position_embeddings=64,
        num_labels=2)), cls_batches),
    "electra_cls": (lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(
        vocab_size=V, embedding_size=32, hidden_size=H, num_hidden_layers=NL,
        num_attention_heads=NH, intermediate_size=FF, max_position_embeddings=64,
        num_labels=2)), cls_batches),
    "vit": (lambda: tf.ViTForImageClassification(tf.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=H, num_hidden_layers=NL,
        num_attention_heads=NH, intermediate_size=FF, num_labels=10)), img_batches),
    "whisper": (lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        vocab_size=V, num_mel_bins=16, d_model=H, encoder_layers=NL, decoder_layers=NL,
        encoder_attention_heads=NH, decoder_attention_heads=NH, encoder_ffn_dim=FF,
        decoder_ffn_dim=FF, max_source_positions=32, max_target_positions=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=3, suppress_tokens=[],
        begin_suppress_tokens=[])), whisper_batches),
    "wav2vec2_cls": (lambda: tf.Wav2Vec2ForSequenceClassification(tf.Wav2Vec2Config(
        vocab_size=V, hidden_size=H, num_hidden_layers=NL, num_attention_heads=NH,
        intermediate_size=FF, conv_dim=(32, 32), conv_stride=(5, 5), conv_kernel=(10, 5),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, mask_time_prob=0.0,
        num_labels=4, classifier_proj_size=32)), audio_cls_batches),
    "llama_tied": dec(tf.LlamaConfig, tf.LlamaForCausalLM, **llama_kw(tie_word_embeddings=True)),
    "llama_untied": dec(tf.LlamaConfig, tf.LlamaForCausalLM,
                        **llama_kw(tie_word_embeddings=False)),
}


class _Muon:
    """``torch.optim.Muon`` on the weights of the ``nn.Linear`` layers inside the model's
    repeated blocks (an ``nn.ModuleList``), Moonlight's RMS match to AdamW; ``torch.optim.AdamW``
    on everything else (embeddings, heads, norms, biases), both at one lr, as Muon's authors
    pair them (``scripts/benchmark.py``'s ``torch_muon``)."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        hidden = {id(m.weight): m.weight for blocks in model.modules()
                  if isinstance(blocks, torch.nn.ModuleList) for m in blocks.modules()
                  if isinstance(m, torch.nn.Linear) and m.weight.requires_grad}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden]
        self.optimizers = [torch.optim.AdamW(rest, lr=lr)]
        if hidden:
            self.optimizers.append(torch.optim.Muon(list(hidden.values()), lr=lr,
                                                    weight_decay=0.01,
                                                    adjust_lr_fn="match_rms_adamw"))

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad()


def train(arch: str, kind: str, lr: float, seed: int, steps: int = STEPS,
          slnb_args: dict | None = None) -> dict:
    """One run: final loss (mean of the last 5), spikes (a loss above 1.5x the first after step
    10, or non-finite), the preset, warnings (text) and any error."""
    build, data_fn = ARCHS[arch]
    out: dict = {"warnings": set()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.manual_seed(seed)
            model = build()
            model.train()
            if kind == "adamw":
                opt = torch.optim.AdamW(model.parameters(), lr=lr)
            elif kind == "muon":
                opt = _Muon(model, lr)
            else:
                opt = SLNB(model.parameters(), model=model, lr=lr, **(slnb_args or {}))
                out["preset"] = opt.preset
            losses = []
            for batch in data_fn(steps, seed=seed):
                loss = model(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(float(loss))
            out["final"] = statistics.fmean(losses[-5:])
            out["spikes"] = sum(1 for v in losses[10:] if not math.isfinite(v)
                                or v > 1.5 * losses[0])
        except Exception:  # noqa: BLE001 - reported, the sweep goes on
            out["error"] = traceback.format_exc(limit=3)
    out["warnings"] = {str(w.message).split(":")[0][:120] for w in caught
                       if "SLNB" in str(w.message) or "slnb" in w.filename}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated architectures")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--muon", action="store_true",
                        help="also torch.optim.Muon (on the blocks' Linear weights, AdamW on "
                        "the rest) over the same lrs")
    parser.add_argument("--slnb-args", default="", metavar="KEY=VALUE,...",
                        help="SLNB options beside lr (numbers as floats), e.g. rest_lr_scale=0.1")
    args = parser.parse_args()
    slnb_args = dict(kv.split("=", 1) for kv in args.slnb_args.split(",") if kv)
    for key, value in slnb_args.items():
        try:
            slnb_args[key] = float(value)
        except ValueError:
            pass
    torch.set_num_threads(1)
    tf.logging.set_verbosity_error()
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    only = [a for a in args.only.split(",") if a]
    print(f"torch {torch.__version__}, transformers {tf.__version__}, {args.steps} steps, batch {B}, "
          f"seeds {seeds}, lrs {lrs}, SLNB options {slnb_args or 'its defaults'}: final train "
          "loss, mean over seeds, at each optimizer's best lr")
    kinds = ("adamw", "slnb") + (("muon",) if args.muon else ())
    muon = ("Muon (lr) | ", "---|") if args.muon else ("", "")
    names = " / ".join({"adamw": "AdamW", "slnb": "SLNB", "muon": "Muon"}[k] for k in kinds)
    print(f"| architecture | SLNB preset | AdamW (lr) | SLNB (lr) | SLNB at AdamW's lr | "
          f"{muon[0]}spikes {names} | SLNB warnings, errors |")
    print(f"|---|---|---|---|---|{muon[1]}---|---|")
    for arch in ARCHS:
        if only and arch not in only:
            continue
        best, notes, preset, spikes, means = {}, set(), "-", {}, {}
        for kind in kinds:
            for lr in lrs:
                runs = [train(arch, kind, lr, s, args.steps, slnb_args) for s in seeds]
                for r in runs:
                    if "error" in r:
                        notes.add(f"{kind} lr={lr:g}: " + r["error"].strip().splitlines()[-1])
                    if kind == "slnb":
                        notes |= r["warnings"]
                        preset = r.get("preset", preset)
                if all("final" in r for r in runs):
                    mean = means[kind, lr] = statistics.fmean(r["final"] for r in runs)
                    if kind not in best or mean < best[kind][0]:
                        best[kind] = (mean, lr)
                        spikes[kind] = sum(r["spikes"] for r in runs)
        cells = {k: f"{best[k][0]:.3f} ({best[k][1]:g})" if k in best else "failed"
                 for k in kinds}
        at = means.get(("slnb", best["adamw"][1])) if "adamw" in best else None
        cells["at"] = "-" if at is None else f"{at:.3f}"
        extra = f"{cells['muon']} | " if args.muon else ""
        print(f"| {arch} | {preset} | {cells['adamw']} | {cells['slnb']} | {cells['at']} | "
              f"{extra}{' / '.join(str(spikes.get(k, '-')) for k in kinds)} | "
              f"{'; '.join(sorted(notes)) or '-'} |", flush=True)


if __name__ == "__main__":
    main()
