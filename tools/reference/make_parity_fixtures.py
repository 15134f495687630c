#!/usr/bin/env python3
"""Reference tensors for gemmaclip's parity tests, computed by transformers' own classes.

Loads the tiny checkpoint that `gemmaclip init --preset tiny --seed 0` writes, runs
  - Gemma3ForCausalLM on a prompt longer than the sliding window, and on a right-padded batch of two;
  - CLIPVisionModel, taking hidden_states[-2] without CLS (LLaVA's feature choice);
  - the LLaVA-style forward: CLIP -> projector (Linear, GELU, Linear) -> features replace the
    <image_soft_token> embeddings -> Gemma3ForCausalLM with labels on the model turn only;
and saves inputs and outputs to tests/fixtures/parity.safetensors (f32, eager attention).

Run from the repository root (versions pinned in tools/reference/requirements.txt):
  cargo run --release -- init --preset tiny --seed 0 --out /tmp/gemmaclip-tiny
  python3 tools/reference/make_parity_fixtures.py --model-dir /tmp/gemmaclip-tiny
"""
import argparse
import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPVisionModel, Gemma3Config, Gemma3ForCausalLM

IGNORE = -100


def load_gemma(llm_dir):
    cfg = Gemma3Config.from_pretrained(llm_dir).text_config
    cfg._attn_implementation = "eager"
    model = Gemma3ForCausalLM(cfg).float().eval()
    state = {}
    for k, v in load_file(os.path.join(llm_dir, "model.safetensors")).items():
        assert k.startswith("language_model.model."), k
        state["model." + k[len("language_model.model."):]] = v
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert missing == ["lm_head.weight"], missing  # tied to embed_tokens
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model, cfg


def chat_prompt(question, answer, n_image_tokens):
    image = "<start_of_image>" + "<image_soft_token>" * n_image_tokens + "<end_of_image>\n" if n_image_tokens else ""
    user = f"<bos><start_of_turn>user\n{image}Question: {question}<end_of_turn>\n<start_of_turn>model\n"
    return user, f"{answer}<end_of_turn>"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="output of `gemmaclip init --preset tiny --seed 0`")
    ap.add_argument("--out", default="tests/fixtures/parity.safetensors")
    args = ap.parse_args()
    torch.manual_seed(1234)
    llm_dir, vis_dir = os.path.join(args.model_dir, "llm"), os.path.join(args.model_dir, "vision")

    gemma, tcfg = load_gemma(llm_dir)
    full_cfg = json.load(open(os.path.join(llm_dir, "config.json")))
    image_token = full_cfg["image_token_index"]
    tok = AutoTokenizer.from_pretrained(llm_dir)
    clip = CLIPVisionModel.from_pretrained(vis_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    n_patches = (clip.config.image_size // clip.config.patch_size) ** 2
    out = {}
    meta = {"transformers": __import__("transformers").__version__, "torch": torch.__version__}

    with torch.no_grad():
        out["check.embed_tokens_row1"] = gemma.model.embed_tokens.weight[1].clone()

        # 1. A chat prompt longer than the sliding window, through the HF tokenizer.
        user, answer = chat_prompt("Which gas do plants take in?", "Carbon dioxide.", 0)
        text = user + answer
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        assert ids.shape[1] > 2 * tcfg.sliding_window, ids.shape
        meta["text.prompt"] = text
        out["text.input_ids"] = ids
        out["text.logits"] = gemma(input_ids=ids).logits[0]

        # 2. A right-padded batch of two (random ids below the image tokens).
        lens = [37, 23]
        L = max(lens)
        batch = torch.zeros(2, L, dtype=torch.long)
        mask = torch.zeros(2, L, dtype=torch.long)
        for b, n in enumerate(lens):
            batch[b, :n] = torch.randint(3, full_cfg["boi_token_index"], (n,))
            batch[b, 0] = 2
            mask[b, :n] = 1
        out["batch.input_ids"] = batch
        out["batch.attention_mask"] = mask
        out["batch.logits"] = gemma(input_ids=batch, attention_mask=mask).logits

        # 3. CLIP hidden_states[-2] without CLS.
        px = torch.randn(2, 3, clip.config.image_size, clip.config.image_size)
        out["clip.pixel_values"] = px
        out["clip.features"] = clip(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]

    # 4. The LLaVA-style forward with a random projector and labels on the model turn.
    proj = torch.nn.Sequential(
        torch.nn.Linear(clip.config.hidden_size, tcfg.hidden_size),
        torch.nn.GELU(),
        torch.nn.Linear(tcfg.hidden_size, tcfg.hidden_size),
    )
    rows, labels = [], []
    for q, a in [("What does the diagram show?", "A food web."), ("Which is a mammal?", "B) whale")]:
        user, answer = chat_prompt(q, a, n_patches)
        u = tok(user, add_special_tokens=False).input_ids
        t = tok(answer, add_special_tokens=False).input_ids
        rows.append(u + t)
        labels.append([IGNORE] * len(u) + t)
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    lab = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, (r, l) in enumerate(zip(rows, labels)):
        ids[b, : len(r)] = torch.tensor(r)
        lab[b, : len(l)] = torch.tensor(l)
        mask[b, : len(r)] = 1
    px = torch.randn(len(rows), 3, clip.config.image_size, clip.config.image_size)
    with torch.no_grad():
        feats = proj(clip(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:])
        embeds = gemma.model.embed_tokens(ids)  # scaled by sqrt(hidden) in the weight dtype
        where = ids == image_token
        assert int(where.sum()) == feats.shape[0] * feats.shape[1]
        embeds[where] = feats.reshape(-1, feats.shape[-1])  # image features are not scaled
        res = gemma(inputs_embeds=embeds, attention_mask=mask, labels=lab)
        sup = lab[:, 1:] != IGNORE  # position t predicts label t + 1
        out["vlm.input_ids"] = ids
        out["vlm.attention_mask"] = mask
        out["vlm.labels"] = lab
        out["vlm.pixel_values"] = px
        out["vlm.projector.linear_1.weight"] = proj[0].weight
        out["vlm.projector.linear_1.bias"] = proj[0].bias
        out["vlm.projector.linear_2.weight"] = proj[2].weight
        out["vlm.projector.linear_2.bias"] = proj[2].bias
        out["vlm.loss"] = res.loss.reshape(())
        out["vlm.supervised_logits"] = res.logits[:, :-1][sup]

    out = {k: v.detach().contiguous() for k, v in out.items()}
    save_file(out, args.out, metadata=meta)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in out.items()))
    print(f"vlm loss {out['vlm.loss'].item():.6f}")


if __name__ == "__main__":
    main()
