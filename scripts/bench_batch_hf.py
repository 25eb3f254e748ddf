#!/usr/bin/env python3
"""Python side of the batched-decode rows of scripts/bench-infer.sh: HF transformers'
`generate()` (greedy, float32, eager attention) on the same model directory and the same prompts
as `dsv3 generate --prompts FILE --batch-size B`, on the same thread count. All prompts of a
batch have the same length, so no padding is involved on either side.

Decode time is the time of `generate(max_new_tokens=N)` minus that of `generate(max_new_tokens=1)`
(the prefill and the first token), best of two each; tokens/s are summed over the batch's rows:
B · (N - 1) / decode time. Prints one JSON object {"batches": [{"batch", "decode_tokens_per_sec",
"tokens"}...]}.

usage: bench_batch_hf.py MODEL_DIR PROMPTS_JSONL NEW_TOKENS THREADS BATCH...
"""
import json
import sys
import time

import torch
from transformers import DeepseekV3ForCausalLM


def main():
    model_dir, prompts_file, new_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    batches = [int(b) for b in sys.argv[5:]]
    torch.set_num_threads(threads)
    prompts = [json.loads(line)["tokens"] for line in open(prompts_file) if line.strip()]
    model = DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    # Greedy, every row runs to N new tokens (no EOS stop), as `--ignore-eos` does on our side.
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)
    out = []
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0][:16]]), max_new_tokens=2, min_new_tokens=2, **gen)  # warm-up
        for b in batches:
            x = torch.tensor(prompts[:b])

            def timed(n):
                best = float("inf")
                for _ in range(2):
                    t = time.perf_counter()
                    y = model.generate(x, max_new_tokens=n, min_new_tokens=n, **gen)
                    best = min(best, time.perf_counter() - t)
                return best, y

            first, _ = timed(1)
            full, y = timed(new_tokens)
            out.append({
                "batch": b,
                "decode_tokens_per_sec": b * (new_tokens - 1) / max(full - first, 1e-9),
                "tokens": y[:, x.shape[1]:].tolist(),
            })
            print(f"hf batch {b}: {out[-1]['decode_tokens_per_sec']:.1f} tok/s", file=sys.stderr)
    print(json.dumps({"batches": out}))


if __name__ == "__main__":
    main()
