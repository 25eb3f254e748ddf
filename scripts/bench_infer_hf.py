#!/usr/bin/env python3
"""Python side of scripts/bench-infer.sh: PyTorch + HF transformers (eager attention, float32)
on the same model directory, same prompt, same thread count; plus the machine's copy bandwidth
and the bytes of weights one decode step reads. Prints one JSON object.

usage: bench_infer_hf.py MODEL_DIR PROMPT_IDS_FILE NEW_TOKENS THREADS
"""
import json
import sys
import time

import numpy as np
import torch
from safetensors import safe_open
from transformers import DeepseekV3ForCausalLM


def copy_bandwidth(nbytes=512 << 20, reps=5):
    """Bytes moved per second (read + write) by a large single-threaded memcpy."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def decode_weight_bytes(model_dir, cfg):
    """Weight bytes read by one batch-1 decode step of the main model (f32): every non-expert
    tensor of layers 0..L-1, k of the E routed experts per MoE layer, the final norm, lm_head,
    and one embedding row. The MTP layer is not read by plain decoding."""
    L, E, k = cfg["num_hidden_layers"], cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    total = 0
    with safe_open(f"{model_dir}/model.safetensors", "np") as f:
        for name in f.keys():
            n = int(np.prod(f.get_slice(name).get_shape())) * 4
            if name == "model.embed_tokens.weight":
                total += cfg["hidden_size"] * 4
                continue
            if name.startswith("model.layers."):
                layer = int(name.split(".")[2])
                if layer >= L:
                    continue
                if ".mlp.experts." in name:
                    total += n * k / E
                    continue
            total += n
    return total


def main():
    model_dir, ids_file, new_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    ids = [int(x) for x in open(ids_file).read().strip().split(",")]
    cfg = json.load(open(f"{model_dir}/config.json"))
    model = DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    x = torch.tensor([ids])
    with torch.inference_mode():
        model(x[:, :16], use_cache=True)  # warm-up
        prefill = []
        for _ in range(3):
            t = time.perf_counter()
            out = model(x, use_cache=True)
            prefill.append(time.perf_counter() - t)
        cache = out.past_key_values
        kv_bytes = 0
        for layer in getattr(cache, "layers", []):
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if tensor is not None:
                    kv_bytes += tensor.numel() * tensor.element_size()
        decode = []
        for _ in range(2):
            out = model(x, use_cache=True)
            pkv = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            tokens = [int(nxt)]
            t = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = model(nxt, past_key_values=pkv, use_cache=True)
                pkv = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
                tokens.append(int(nxt))
            decode.append((new_tokens - 1) / (time.perf_counter() - t))
    print(json.dumps({
        "hf_prefill_tokens_per_sec": len(ids) / min(prefill),
        "hf_decode_tokens_per_sec": max(decode),
        "hf_kv_bytes_per_token": kv_bytes / len(ids),
        "hf_greedy_tokens": tokens,
        "copy_bandwidth_bytes_per_sec": copy_bandwidth(),
        "decode_weight_bytes_per_token": decode_weight_bytes(model_dir, cfg),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
    }))


if __name__ == "__main__":
    main()
