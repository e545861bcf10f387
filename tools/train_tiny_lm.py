"""Trains the tiny language model the quantized all-reduce model test uses (tests/assets/).

Random-weight models make a poor test of whether a perturbation keeps the top-1 prediction:
their next-token distributions are nearly flat, so tiny logit changes flip near-ties that a
trained model does not have. This trains a tiny Hugging Face Mamba on a synthetic source with
structure a state-space model must carry across tokens - an order-2 Markov chain: the next token
is table[previous two tokens] with probability 0.9, uniform otherwise - until its predictions are
confident, and saves it as a checkpoint tpssm loads.

    python tools/train_tiny_lm.py OUT_DIR [--steps 400] [--seed 0]

Takes a few minutes on 2 CPU cores (transformers' reference scan). The same source generates the
test's prompts (tests/test_qallreduce_model.py imports markov_tokens from here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

VOCAB = 64
NOISE = 0.1
TABLE_SEED = 1234


def markov_table() -> torch.Tensor:
    return torch.randint(VOCAB, (VOCAB, VOCAB), generator=torch.Generator().manual_seed(TABLE_SEED))


def markov_tokens(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, length) int64 tokens of the order-2 source."""
    table = markov_table()
    x = torch.empty(batch, length, dtype=torch.long)
    x[:, :2] = torch.randint(VOCAB, (batch, 2), generator=generator)
    for t in range(2, length):
        follow = table[x[:, t - 2], x[:, t - 1]]
        noise = torch.rand(batch, generator=generator) < NOISE
        x[:, t] = torch.where(noise, torch.randint(VOCAB, (batch,), generator=generator), follow)
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import transformers

    torch.manual_seed(args.seed)
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                   state_size=16, expand=2, conv_kernel=4, use_bias=False,
                                   use_conv_bias=True)
    model = transformers.MambaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=args.steps)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        x = markov_tokens(64, 24, g)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}/{args.steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)",
                  flush=True)
    model.eval()
    # The source's own entropy per token is the floor of the loss (~0.73 nats).
    with torch.no_grad():
        x = markov_tokens(64, 64, torch.Generator().manual_seed(99))
        probs = model(x).logits[:, 2:-1].softmax(-1)
        top2 = probs.topk(2, dim=-1).values
    stats = {"steps": args.steps, "final_loss": loss.item(),
             "mean_top1_prob": top2[..., 0].mean().item(),
             "median_top1_top2_prob_gap": (top2[..., 0] - top2[..., 1]).median().item()}
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    (args.out / "training.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
