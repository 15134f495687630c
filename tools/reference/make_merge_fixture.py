#!/usr/bin/env python3
"""Reference for `gemmaclip merge`: PEFT's own merge_and_unload on the tiny model.

Loads the tiny checkpoint (`gemmaclip init --preset tiny --seed 0`, OUT/llm) with
Gemma3ForConditionalGeneration.from_pretrained in f32 -- the tiny config says model_type "gemma3",
as google/gemma-3-4b-it's does, and its file holds only the language model, so the SigLIP tower and
Gemma's own projector are the only missing keys -- applies the committed adapter
tests/fixtures/lora_init (B is random, not zero, so the merge is not trivially W) with
PeftModel.from_pretrained, asserting that every tensor of the adapter landed, calls
merge_and_unload() and saves to tests/fixtures/merge/peft_merged.safetensors (f32):
  check.embed_tokens_row1       the base's first embedding row (a changed `init` shows up here first)
  merged.<checkpoint name>      a few merged weight matrices, under the checkpoint's own tensor names
                                (language_model.model.layers.N....weight)
  rslora.<checkpoint name>      one matrix merged with use_rslora = true (scale alpha / sqrt(r))
  prompt.input_ids, prompt.logits   a chat prompt longer than the sliding window and the merged
                                model's logits for it (eager attention)

With --check-merged DIR it instead loads what `gemmaclip merge` wrote there with
Gemma3ForConditionalGeneration.from_pretrained, checks that every language-model key was found
(and nothing unexpected), and prints the largest difference of every language-model weight and
of the prompt's logits against PEFT's merge of the same base and adapter.

Run from the repository root (versions pinned in tools/reference/requirements.txt):
  cargo run --release -- init --preset tiny --seed 0 --out /tmp/gemmaclip-tiny
  python3 tools/reference/make_merge_fixture.py --model-dir /tmp/gemmaclip-tiny
  cargo run --release -- merge --preset tiny --adapter-dir tests/fixtures/lora_init --no-projector \
      --dtype f32 --output-dir /tmp/merged
  python3 tools/reference/make_merge_fixture.py --model-dir /tmp/gemmaclip-tiny --check-merged /tmp/merged
"""
import argparse
import json
import os
import shutil
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

PREFIX = "language_model.model."
# the checkpoint names of the matrices the fixture keeps (layer 5 is a global-attention layer)
KEPT = [
    "layers.0.self_attn.q_proj.weight",
    "layers.3.self_attn.v_proj.weight",
    "layers.5.self_attn.o_proj.weight",
    "layers.7.mlp.down_proj.weight",
]
RSLORA_KEPT = "layers.1.self_attn.k_proj.weight"


def load_base(llm_dir, dtype=torch.float32):
    model, info = Gemma3ForConditionalGeneration.from_pretrained(
        llm_dir, dtype=dtype, attn_implementation="eager", output_loading_info=True
    )
    model.eval()
    # the tiny checkpoint holds only the language model: the SigLIP tower and Gemma's projector are
    # the only keys allowed to be missing
    stray = [k for k in info["missing_keys"] if not k.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    assert not stray, f"missing language-model keys: {stray}"
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    lm = model.model.language_model
    assert model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr(), "lm_head is not tied"
    return model


def merged_model(llm_dir, adapter_dir):
    model = load_base(llm_dir)
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    ours = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    named = dict(peft_model.named_parameters())
    for k, v in ours.items():
        live = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert live in named, f"PEFT did not place {k}"
        assert torch.equal(named[live].detach(), v), k
    assert len([n for n in named if "lora_" in n]) == len(ours)
    return peft_model.merge_and_unload()


def lm_weights(model):
    """The language model's weights under the checkpoint's names (language_model.model.*)."""
    return {PREFIX + k: v for k, v in model.model.language_model.state_dict().items()}


def prompt_ids(llm_dir, sliding_window):
    tok = AutoTokenizer.from_pretrained(llm_dir)
    text = "<bos><start_of_turn>user\nWhich gas?<end_of_turn>\n<start_of_turn>model\nB<end_of_turn>"
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids.shape[1] > sliding_window, ids.shape
    return ids


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def make(args, llm_dir):
    torch.manual_seed(0)
    base = lm_weights(load_base(llm_dir))
    merged = merged_model(llm_dir, args.adapter)
    weights = lm_weights(merged)
    cfg = merged.config.text_config
    ids = prompt_ids(llm_dir, cfg.sliding_window)
    out = {"check.embed_tokens_row1": weights[PREFIX + "embed_tokens.weight"][1].clone()}
    for k in KEPT:
        name = PREFIX + k
        moved = (weights[name] - base[name]).abs().max().item()
        assert moved > 1e-3, f"{name}: the merge left the weight unchanged ({moved}); is lora_B zero?"
        out["merged." + name] = weights[name]
    out["prompt.input_ids"] = ids[0]
    out["prompt.logits"] = logits(merged, ids)

    # use_rslora: the same adapter with scale alpha / sqrt(r)
    with tempfile.TemporaryDirectory() as d:
        for f in ["adapter_model.safetensors", "adapter_config.json"]:
            shutil.copy(os.path.join(args.adapter, f), d)
        cfg_path = os.path.join(d, "adapter_config.json")
        c = json.load(open(cfg_path))
        c["use_rslora"] = True
        json.dump(c, open(cfg_path, "w"), indent=2, sort_keys=True)
        out["rslora." + PREFIX + RSLORA_KEPT] = lm_weights(merged_model(llm_dir, d))[PREFIX + RSLORA_KEPT]

    import peft
    import transformers

    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "adapter": args.adapter}
    out = {k: v.detach().contiguous() for k, v in out.items()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    save_file(out, args.out, metadata=meta)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes): "
          + ", ".join(f"{k} {list(v.shape)}" for k, v in out.items()))


def check(args, llm_dir):
    """Loads a `gemmaclip merge` output with transformers and compares it with PEFT's merge."""
    reference = merged_model(llm_dir, args.adapter)
    ref_w = lm_weights(reference)
    cfg = json.load(open(os.path.join(args.check_merged, "config.json")))
    dtype = cfg.get("dtype", cfg.get("torch_dtype"))
    print(f"config.json dtype: {dtype}")
    ours = load_base(args.check_merged, dtype="auto")
    print(f"loaded with dtype=auto as {next(ours.model.language_model.parameters()).dtype}")
    ours = ours.float()
    our_w = lm_weights(ours)
    assert set(our_w) == set(ref_w), set(our_w) ^ set(ref_w)
    worst = max(((our_w[k] - ref_w[k]).abs().max().item(), k) for k in ref_w)
    print(f"max |merged weight difference| over {len(ref_w)} language-model tensors: {worst[0]:.3g} ({worst[1]})")
    ids = prompt_ids(llm_dir, reference.config.text_config.sliding_window)
    d = (logits(ours, ids) - logits(reference, ids)).abs().max().item()
    print(f"max |logit difference| on a {ids.shape[1]}-token prompt: {d:.3g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="output of `gemmaclip init --preset tiny --seed 0`")
    ap.add_argument("--adapter", default="tests/fixtures/lora_init")
    ap.add_argument("--out", default="tests/fixtures/merge/peft_merged.safetensors")
    ap.add_argument("--check-merged", help="a `gemmaclip merge` output directory to load and compare")
    args = ap.parse_args()
    llm_dir = os.path.join(args.model_dir, "llm")
    if args.check_merged:
        check(args, llm_dir)
    else:
        make(args, llm_dir)


if __name__ == "__main__":
    main()
