#!/usr/bin/env python3
"""Reference LoRA/projector gradients from PEFT, for gemmaclip's gradient tests.

Loads the tiny checkpoint (`gemmaclip init --preset tiny --seed 0`) into transformers'
Gemma3ForConditionalGeneration (its own SigLIP tower and projector stay unused), loads the LoRA
adapter that gemmaclip wrote (tests/fixtures/lora_init, made by
`cargo run --release --example lora_fixture_init`) with PeftModel.from_pretrained -- so this also
checks that PEFT reads our adapter format with every key matched -- and runs the LLaVA-style forward
of tests/fixtures/parity.safetensors' `vlm.*` batch (CLIP layer -2 -> projector -> splice -> Gemma,
loss on the model turn) in f32, then backward. Saved to tests/fixtures/grads.safetensors:
  dense.<key>  gradients with the unquantized base
  nf4.<key>    gradients with every base linear replaced by bitsandbytes' NF4 round trip
               (quantize_4bit(blocksize=64, nf4) then dequantize_4bit, f32)
  dense.loss, nf4.loss
where <key> is the adapter key (base_model.model.model.language_model.layers.N....lora_A.weight)
or projector.linear_{1,2}.{weight,bias}. It also re-saves the adapter with PEFT's save_pretrained to
tests/fixtures/peft_saved/ so the Rust side can read what PEFT writes.

  python3 tools/reference/make_grad_fixtures.py --model-dir /tmp/gemmaclip-tiny
"""
import argparse
import os

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel, Gemma3Config, Gemma3ForConditionalGeneration

IGNORE = -100


def build(llm_dir, adapter_dir):
    cfg = Gemma3Config.from_pretrained(llm_dir)
    cfg.text_config._attn_implementation = "eager"
    cfg._attn_implementation = "eager"
    model = Gemma3ForConditionalGeneration(cfg).float().eval()
    lm = model.model.language_model
    state = {k[len("language_model.model."):]: v for k, v in load_file(os.path.join(llm_dir, "model.safetensors")).items()}
    missing, unexpected = lm.load_state_dict(state, strict=True), None
    model.tie_weights()
    peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    # Every tensor of our file landed on a module, and only language-model linears got adapters.
    ours = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    named = dict(peft_model.named_parameters())
    loaded = 0
    for k, v in ours.items():
        live = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert live in named, f"PEFT did not place {k}"
        assert torch.equal(named[live].detach(), v), k
        loaded += 1
    lora_params = [n for n in named if "lora_" in n]
    assert len(lora_params) == loaded, (len(lora_params), loaded)
    assert not any("vision_tower" in n for n in lora_params)
    return peft_model, lm


def run(peft_model, lm, clip, proj, batch):
    for p in peft_model.parameters():
        if p.grad is not None:
            p.grad = None
    for p in proj.parameters():
        p.grad = None
    ids, mask, labels, px = batch
    with torch.no_grad():
        feats = clip(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
    feats = proj(feats)
    embeds = lm.embed_tokens(ids)
    where = ids == peft_model.base_model.model.config.image_token_index
    embeds = embeds.masked_scatter(where.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
    hidden = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    logits = peft_model.base_model.model.lm_head(hidden).float()
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE)
    loss.backward()
    out = {"loss": loss.detach().reshape(())}
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            out[n.replace(".default.weight", ".weight")] = p.grad.detach().clone()
    for name, p in zip(["linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"], proj.parameters()):
        out["projector." + name] = p.grad.detach().clone()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--adapter", default="tests/fixtures/lora_init")
    ap.add_argument("--batch", default="tests/fixtures/parity.safetensors")
    ap.add_argument("--out", default="tests/fixtures/grads.safetensors")
    ap.add_argument("--peft-saved", default="tests/fixtures/peft_saved")
    args = ap.parse_args()
    llm_dir, vis_dir = os.path.join(args.model_dir, "llm"), os.path.join(args.model_dir, "vision")

    peft_model, lm = build(llm_dir, args.adapter)
    clip = CLIPVisionModel.from_pretrained(vis_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    pw = load_file(os.path.join(args.adapter, "projector.safetensors"))
    d_in, d_out = pw["linear_1.weight"].shape[1], pw["linear_1.weight"].shape[0]
    proj = torch.nn.Sequential(torch.nn.Linear(d_in, d_out), torch.nn.GELU(), torch.nn.Linear(d_out, d_out))
    with torch.no_grad():
        proj[0].weight.copy_(pw["linear_1.weight"]); proj[0].bias.copy_(pw["linear_1.bias"])
        proj[2].weight.copy_(pw["linear_2.weight"]); proj[2].bias.copy_(pw["linear_2.bias"])
    f = load_file(args.batch)
    batch = (f["vlm.input_ids"], f["vlm.attention_mask"], f["vlm.labels"], f["vlm.pixel_values"])

    out = {f"dense.{k}": v for k, v in run(peft_model, lm, clip, proj, batch).items()}

    # NF4 base: every frozen linear of the language model through bitsandbytes' round trip.
    import bitsandbytes.functional as bnbf
    with torch.no_grad():
        for name, mod in lm.named_modules():
            base = getattr(mod, "base_layer", None)
            if base is not None and isinstance(base, torch.nn.Linear):
                q, state = bnbf.quantize_4bit(base.weight.data, blocksize=64, quant_type="nf4")
                base.weight.data = bnbf.dequantize_4bit(q, state).to(torch.float32)
    out.update({f"nf4.{k}": v for k, v in run(peft_model, lm, clip, proj, batch).items()})

    out = {k: v.contiguous() for k, v in out.items()}
    import bitsandbytes, peft, transformers
    save_file(out, args.out, metadata={"torch": torch.__version__, "transformers": transformers.__version__,
                                       "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__})
    # reload the pristine adapter and let PEFT write it in its own hand
    fresh, _ = build(llm_dir, args.adapter)
    fresh.save_pretrained(args.peft_saved)
    print(f"wrote {args.out} ({len(out)} tensors); dense loss {out['dense.loss'].item():.6f}, nf4 loss {out['nf4.loss'].item():.6f}")


if __name__ == "__main__":
    main()
