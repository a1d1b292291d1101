#!/usr/bin/env python3
"""The peer of gpu_decode_bench: Hugging Face transformers' MixtralForCausalLM
decoding on the same checkpoint, in BF16 on one CUDA GPU, at the same batch
sizes and context.

The checkpoint is the folder `switchyard make-model --preset mixtral-8x7b
--layers N --out DIR` writes (the hub layout: config.json, safetensors shards
and their index), loaded as it is with from_pretrained. Each sequence holds
--context tokens (the same token ids as gpu_decode_bench) prefilled once;
every timed step decodes one token per sequence and crops the KV cache back
to the context, so every step is the same, as in gpu_decode_bench. Steps are
timed with CUDA events (median of --iters after --warmup).

The LM head runs for every sequence and, inside the timed step, the logits
are copied to the host, as serving needs them and as gpu_decode_bench's
logits:1 rows do: compare with those rows. --logits-on-gpu leaves them on the
GPU (no row of gpu_decode_bench matches that: its logits:0 rows skip the LM
head altogether).

Usage (on the GPU machine; see bench/gpu/README.md):
  python3 bench/hf_peer_bench.py --model DIR [--batches 1,16,64,256]
      [--context 128] [--iters 20] [--warmup 3] [--attn sdpa|eager]
      [--logits-on-gpu] [--json OUT.json]
"""

import argparse
import copy
import json
import os
import statistics
import sys


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("SWITCHYARD_GPU_BENCH_MODEL"),
                   help="checkpoint folder (default: $SWITCHYARD_GPU_BENCH_MODEL)")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--logits-on-gpu", action="store_true",
                   help="leave the logits on the GPU (default: copy them to the host)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args()


def load_model(path, attn):
    import torch
    from transformers import MixtralForCausalLM

    kwargs = dict(device_map="cuda", attn_implementation=attn)
    try:  # transformers >= 4.56 calls it dtype; older versions torch_dtype
        model = MixtralForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs)
    except TypeError:
        model = MixtralForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, **kwargs)
    model.eval()
    # A transformers version that ignored the dtype argument would time FP32.
    dtype = next(model.parameters()).dtype
    if dtype != torch.bfloat16:
        sys.exit(f"the model loaded as {dtype}, not torch.bfloat16")
    return model


def last_logits_only(model):
    """Forward kwargs that make the prefill compute the last position's logits
    only ([B, 1, V] rather than [B, context, V]: GBs at batch 256)."""
    import inspect
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):  # newer, older transformers
        if name in params:
            return {name: 1}
    return {}


def prompt_ids(batch, context, vocab):
    # The token ids gpu_decode_bench uses.
    return [[1 + (b * 7919 + i * 104729) % (vocab - 1) for i in range(context)] for b in range(batch)]


def bench_batch(model, batch, args):
    import torch
    from transformers import DynamicCache

    torch.cuda.reset_peak_memory_stats()
    vocab = model.config.vocab_size
    ids = torch.tensor(prompt_ids(batch, args.context, vocab), device="cuda")
    nxt = torch.tensor([[100 + b % (vocab - 100)] for b in range(batch)], device="cuda")
    with torch.inference_mode():
        cache = DynamicCache()
        model(input_ids=ids, past_key_values=cache, use_cache=True, **last_logits_only(model))
        can_crop = hasattr(cache, "crop")
        prefilled = None if can_crop else copy.deepcopy(cache)

        def step():
            nonlocal cache
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            if not args.logits_on_gpu:
                out.logits.float().cpu()
            return out

        def rewind():
            nonlocal cache
            if can_crop:
                cache.crop(args.context)
            else:
                cache = copy.deepcopy(prefilled)

        for _ in range(args.warmup):
            step()
            rewind()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))  # ms
            rewind()
    ms = statistics.median(times)
    return {"batch": batch, "step_ms": ms, "tokens_per_s": batch / ms * 1e3,
            "min_ms": min(times), "max_ms": max(times),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}


def main():
    args = parse_args()
    if not args.model:
        sys.exit("no model: pass --model DIR or set SWITCHYARD_GPU_BENCH_MODEL")
    import torch
    import transformers
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name(0)}", flush=True)
    model = load_model(args.model, args.attn)
    c = model.config
    print(f"model {args.model}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"ffn {c.intermediate_size}, {c.num_local_experts} experts top-{c.num_experts_per_tok}, "
          f"attention {args.attn}, context {args.context}", flush=True)
    results = []
    for batch in [int(b) for b in args.batches.split(",") if b]:
        try:
            r = bench_batch(model, batch, args)
        except torch.cuda.OutOfMemoryError as e:
            r = {"batch": batch, "error": f"out of memory: {e}".splitlines()[0]}
        torch.cuda.empty_cache()
        results.append(r)
        print(json.dumps(r), flush=True)

    print()
    print(f"{'batch':>6} {'step ms (median)':>17} {'tokens/s':>10} {'min ms':>8} {'max ms':>8} {'peak GB':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['batch']:>6} {r['error']}")
            continue
        print(f"{r['batch']:>6} {r['step_ms']:>17.3f} {r['tokens_per_s']:>10.1f} "
              f"{r['min_ms']:>8.3f} {r['max_ms']:>8.3f} {r['peak_mem_gb']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "context": args.context, "attn": args.attn,
                       "logits_to_host": not args.logits_on_gpu, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
