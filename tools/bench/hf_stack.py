#!/usr/bin/env python3
"""gemmaclip's benchmark of the Python stack it replaces: transformers + PEFT + bitsandbytes QLoRA.

Measures what `gemmaclip bench train-step` and `gemmaclip bench generate` measure, on the same
shapes and settings, and prints JSON lines with the same field names, so the two sit side by side
(see the README, "Speed and memory"):

  python3 tools/bench/hf_stack.py train-step [--checkpointing on|off|both] [--attn sdpa|eager]
                                             [--no-4bit] [--seq 1024] [--label-tokens 256]
                                             [--steps 10] [--warmup 3] [--lora-r 64] [--lora-alpha 128]
  python3 tools/bench/hf_stack.py generate   [--prompt 800] [--new 256] [--lora-r 0] [--attn sdpa] [--no-4bit]

The model: CLIP ViT-L/14-336 (frozen, bf16), LLaVA-1.5's projector Linear(1024, 2560) - GELU -
Linear(2560, 2560) (f32, trainable), Gemma-3-4B's text model at its real 34 layers, hidden 2560
and 262208-token vocabulary. Weights are random, drawn here (nothing is downloaded): time and
memory do not depend on their values. With 4 bits (the default) the bf16 model is saved to a
temporary directory and loaded back through `from_pretrained` with a `BitsAndBytesConfig` (NF4,
double quantization, bf16 compute), the way a user loads google/gemma-3-4b-it.

train-step: one row of `--seq` tokens = <bos> + 576 image positions (the projected CLIP features
replace their embeddings) + random text, labels on the last `--label-tokens`; the QLoRA recipe of
PEFT's documentation (`prepare_model_for_kbit_training`, then LoRA r=64, alpha=128, dropout 0.05
on q/k/v/o/gate/up/down), the model in training mode (so gradient checkpointing and LoRA dropout
are active), then backward, `clip_grad_norm_(1.0)` and `torch.optim.AdamW(lr=1e-4)`. One JSON line
per checkpointing setting; `both` measures without, then with, as gemmaclip does.

generate: <bos> <start_of_image> 576 image positions <end_of_image> + text up to `--prompt` tokens,
greedy, exactly `--new` tokens (no early stop), `--batch-size` copies (1 by default, each with its
own image; several, `1,8,32`, give a line each). Time to first token = best of 3 one-token runs
(vision tower, projector and prefill included); decode speed = batch x (new - 1) / (best of 2 full
runs - first token). `--lora-r N` attaches fresh unmerged LoRA adapters of rank N.

Needs a CUDA GPU. Pinned versions: tools/bench/requirements.txt.
"""
import argparse
import json
import sys
import tempfile
import time

torch = nn = None  # imported in main(), after the arguments parse: --help works without torch

IMAGE_TOKENS = 576  # (336 / 14)^2 CLIP patches, CLS dropped
BOS, BOI, EOI, IMAGE_TOKEN = 2, 255_999, 256_000, 262_144  # google/gemma-3-4b-it's ids
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30


def gemma_text_config(layers):
    """gemma-3-4b-it's text_config: the six keys it publishes and the transformers defaults it relies on."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262_208,
        sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0},
        max_position_embeddings=131_072, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
    )


def clip_vision_config():
    """openai/clip-vit-large-patch14-336's vision tower."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=336, patch_size=14,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)


def gib(n_bytes):
    return round(n_bytes / GIB, 2)


def sync():
    torch.cuda.synchronize()


def build(args):
    """Random-weight Gemma text model (NF4 unless --no-4bit), CLIP tower and projector on the GPU."""
    from transformers import CLIPVisionModel, Gemma3ForCausalLM

    torch.manual_seed(0)
    cfg = gemma_text_config(args.layers)
    with torch.device("cuda"):
        lm = Gemma3ForCausalLM(cfg).to(torch.bfloat16)
    if args.four_bit:
        from transformers import BitsAndBytesConfig

        with tempfile.TemporaryDirectory(prefix="gemmaclip-hf-bench-") as tmp:
            lm.save_pretrained(tmp, safe_serialization=True)
            del lm
            torch.cuda.empty_cache()
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
            lm = Gemma3ForCausalLM.from_pretrained(tmp, quantization_config=q, dtype=torch.bfloat16,
                                                   attn_implementation=args.attn, device_map={"": 0})
    else:
        lm.config._attn_implementation = args.attn
    with torch.device("cuda"):
        clip = CLIPVisionModel(clip_vision_config()).to(torch.bfloat16).eval()
        projector = nn.Sequential(nn.Linear(1024, 2560), nn.GELU(), nn.Linear(2560, 2560)).float()
    clip.requires_grad_(False)
    return lm, clip, projector


def lora_config(r, alpha, dropout):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")


def random_text(n, generator):
    return torch.randint(10, 200_000, (n,), generator=generator).tolist()


def input_embeds(lm, clip, projector, pixels, ids, image_at):
    """Token embeddings (Gemma scales them by sqrt(hidden)) with the 576 rows from `image_at` on
    replaced by the projected CLIP layer -2 patch features (not scaled), as LLaVA splices them."""
    with torch.no_grad():
        feats = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    image = projector(feats.float())
    text = lm.get_input_embeddings()(ids)
    end = image_at + IMAGE_TOKENS
    return torch.cat([text[:, :image_at], image.to(text.dtype), text[:, end:]], dim=1)


def train_step(args):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if args.seq < IMAGE_TOKENS + 2 or args.label_tokens >= args.seq - IMAGE_TOKENS:
        sys.exit(f"--seq {args.seq} must exceed {IMAGE_TOKENS} image tokens + 1 and leave room for --label-tokens")
    t0 = time.perf_counter()
    lm, clip, projector = build(args)
    if args.four_bit:
        # casts the norms and embeddings to f32, as the QLoRA recipe does; checkpointing is set per mode below
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    lm = get_peft_model(lm, lora_config(args.lora_r, args.lora_alpha, args.lora_dropout))
    sync()
    load_s = time.perf_counter() - t0
    resident = torch.cuda.memory_allocated()
    params = [p for p in lm.parameters() if p.requires_grad] + list(projector.parameters())
    trainable = sum(p.numel() for p in params)

    g = torch.Generator().manual_seed(1234)
    rows = [[BOS] + [IMAGE_TOKEN] * IMAGE_TOKENS + random_text(args.seq - 1 - IMAGE_TOKENS, g)
            for _ in range(args.batch_size)]
    ids = torch.tensor(rows, device="cuda")
    labels = torch.full_like(ids, -100)
    labels[:, -args.label_tokens:] = ids[:, -args.label_tokens:]
    pixels = torch.randn(args.batch_size, 3, 336, 336, generator=g).to("cuda", torch.bfloat16)

    modes = {"on": [True], "off": [False], "both": [False, True]}[args.checkpointing]
    for ckpt in modes:
        if ckpt:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_disable()
        lm.train()  # from_pretrained returns eval mode, where transformers skips checkpointing and dropout
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        times = []
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                torch.cuda.reset_peak_memory_stats()
            sync()
            t = time.perf_counter()
            out = lm(inputs_embeds=input_embeds(lm, clip, projector, pixels, ids, 1), labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if step >= args.warmup:
                times.append(time.perf_counter() - t)
        times.sort()
        med = times[len(times) // 2]
        print(json.dumps({
            "what": "hf_train_step", "four_bit": args.four_bit, "attn": args.attn, "grad_ckpt": ckpt,
            "seq": args.seq, "batch_size": args.batch_size, "label_tokens": args.label_tokens, "lora_r": args.lora_r,
            "trainable_params": trainable, "step_ms_median": round(med * 1e3, 1),
            "step_ms_min": round(times[0] * 1e3, 1), "tokens_per_s": round(args.batch_size * args.seq / med, 1),
            "loss": round(out.loss.item(), 4), "gpu": torch.cuda.get_device_name(),
            "load_s": round(load_s, 1), "resident_after_load_gib": gib(resident),
            "peak_alloc_gib": gib(torch.cuda.max_memory_allocated()),
            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()),
            "layers": args.layers,
        }), flush=True)
        del opt, out


def generate(args):
    from peft import get_peft_model

    if args.new < 2:
        sys.exit("--new must be at least 2")
    if args.prompt < IMAGE_TOKENS + 3:
        sys.exit(f"--prompt {args.prompt} must exceed the image block ({IMAGE_TOKENS + 2} tokens)")
    lm, clip, projector = build(args)
    if args.lora_r > 0:
        lm = get_peft_model(lm, lora_config(args.lora_r, 2 * args.lora_r, 0.0))
    lm.eval()
    g = torch.Generator().manual_seed(7)
    prompt = [BOS, BOI] + [IMAGE_TOKEN] * IMAGE_TOKENS + [EOI]
    prompt = prompt + random_text(args.prompt - len(prompt), g)
    for batch in args.batch_size:
        ids = torch.tensor([prompt] * batch, device="cuda")
        pixels = torch.randn(batch, 3, 336, 336, generator=g).to("cuda", torch.bfloat16)
        time_generation(args, lm, clip, projector, ids, pixels)


def time_generation(args, lm, clip, projector, ids, pixels):
    """One JSON line: time to first token and decode tokens/s (every row) for the batch `ids`."""
    batch = ids.shape[0]

    def run(n):
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            emb = input_embeds(lm, clip, projector, pixels, ids, 2)
            lm.generate(inputs_embeds=emb, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync()
        return time.perf_counter() - t

    run(4)
    torch.cuda.reset_peak_memory_stats()
    first = min(run(1) for _ in range(3))
    full = min(run(args.new) for _ in range(2))
    print(json.dumps({
        "what": "hf_generate", "four_bit": args.four_bit, "attn": args.attn, "lora_r": args.lora_r,
        "prompt_tokens": args.prompt, "new_tokens": args.new, "batch_size": batch,
        "time_to_first_token_ms": round(first * 1e3, 1),
        "decode_tokens_per_s": round(batch * (args.new - 1) / (full - first), 1),
        "gpu": torch.cuda.get_device_name(), "peak_alloc_gib": gib(torch.cuda.max_memory_allocated()),
        "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()), "layers": args.layers,
    }), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)

    def common(p):
        p.add_argument("--no-4bit", dest="four_bit", action="store_false", help="keep the base in bf16 instead of NF4")
        p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="transformers' attention implementation")
        p.add_argument("--layers", type=int, default=34,
                       help="Gemma layers (fewer only for a quick check: the numbers are then not comparable)")

    t = sub.add_parser("train-step", help="one QLoRA step on one sample; one JSON line per setting")
    common(t)
    t.add_argument("--checkpointing", choices=["on", "off", "both"], default="both", help="gradient checkpointing")
    t.add_argument("--seq", type=int, default=1024, help="tokens of the synthetic row (image block included)")
    t.add_argument("--label-tokens", type=int, default=256, help="supervised tokens at the end of the row")
    t.add_argument("--batch-size", type=int, default=1, help="rows per step, each with its own image")
    t.add_argument("--steps", type=int, default=10, help="timed steps")
    t.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    t.add_argument("--lora-r", type=int, default=64)
    t.add_argument("--lora-alpha", type=float, default=128.0)
    t.add_argument("--lora-dropout", type=float, default=0.05)

    gp = sub.add_parser("generate", help="time to first token and decode speed (batch 1 by default); one JSON line")
    common(gp)
    gp.add_argument("--prompt", type=int, default=800, help="prompt tokens, image block included")
    gp.add_argument("--new", type=int, default=256, help="new tokens (at least 2)")
    gp.add_argument("--lora-r", type=int, default=0, help="attach fresh LoRA adapters of this rank (0: the base alone)")
    gp.add_argument("--batch-size", type=lambda v: [int(x) for x in v.split(",")], default=[1],
                    help="prompts generated together, e.g. 1,8,32 (a JSON line each); decode tokens/s counts every row")

    args = ap.parse_args()
    global torch, nn
    import torch
    from torch import nn

    if not torch.cuda.is_available():
        sys.exit("hf_stack.py needs a CUDA GPU")
    if args.what == "train-step" and args.steps < 1:
        sys.exit("--steps must be at least 1")
    {"train-step": train_step, "generate": generate}[args.what](args)


if __name__ == "__main__":
    main()
