#!/usr/bin/env python3
"""Training throughput of HF transformers' DeepseekV3ForCausalLM doing what `dsv3 train` does.

Same model shape (read from a `dsv3 train` run's config.json), float32, the same packed corpus
(train/corpus, byte-level `BOS doc EOS`), the same batch (sequences x seq_len), AdamW (0.9,
0.95, wd 0.1, eps 1e-8) and global-norm clipping at 1.0. HF's model has no MTP module in the
forward (it ignores `num_nextn_predict_layers`) and no balance loss: compare with a `dsv3 train`
run whose config has num_nextn_predict_layers = 0 for like-for-like work, and with the default
(MTP on) for what our step really does.

Prints one JSON line: {"tokens_per_s": ..., "threads": ..., "step_s": [...]}.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

CORPUS = [
    "project_README.md", "docs_spec.md", "tests_fixtures_README.md", "backends_src_lib.rs.txt",
    "model_src_checkpoint.rs.txt", "model_src_config.rs.txt", "model_src_error.rs.txt",
    "model_src_fp8.rs.txt", "model_src_lib.rs.txt", "model_src_load.rs.txt",
    "model_src_mla.rs.txt", "model_src_mlp.rs.txt", "model_src_model.rs.txt",
    "model_src_moe.rs.txt", "model_src_mtp.rs.txt", "model_src_norm.rs.txt",
    "model_src_rope.rs.txt", "src_cli_mod.rs.txt",
]


def windows(root, seq_len):
    toks = []
    for name in CORPUS:
        with open(os.path.join(root, "train", "corpus", name), "rb") as f:
            toks += [256] + list(f.read()) + [257]
    n = (len(toks) - 1) // seq_len
    return [toks[w * seq_len: w * seq_len + seq_len + 1] for w in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="config.json of a dsv3 train run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(args.config) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    config = DeepseekV3Config(**cfg)
    config._attn_implementation = "sdpa"
    model = DeepseekV3ForCausalLM(config).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    data = torch.tensor(windows(root, args.seq_len))
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=g)
    times = []
    for step in range(args.warmup + args.steps):
        idx = order[(step * args.batch) % (len(data) - args.batch):][: args.batch]
        batch = data[idx]
        t0 = time.perf_counter()
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    tokens = args.batch * args.seq_len * len(times)
    print(json.dumps({
        "tokens_per_s": tokens / sum(times),
        "threads": args.threads,
        "loss": float(loss),
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": [round(t, 3) for t in times],
    }))


if __name__ == "__main__":
    main()
