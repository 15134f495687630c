#!/usr/bin/env python3
"""Reference pixel values from transformers' CLIPImageProcessor (PIL bicubic), for gemmaclip's
image tests: tests/fixtures/images.safetensors with, per case <c>, <c>.png (the encoded bytes as
u8) and the processor's output for <c>.pad (LLaVA-1.5: expand2square with the CLIP mean colour,
then the processor) and <c>.crop (the processor alone: short side to 336, centre crop). To keep
the file small the outputs are stored as the 8-bit pixels they normalise, [3, 336, 336] u8:
round((x * std + mean) * 255) recovers them exactly (checked below).

  python3 tools/reference/make_image_fixtures.py
"""
import io

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def expand2square(img, bg):
    w, h = img.size
    if w == h:
        return img
    if w > h:
        out = Image.new(img.mode, (w, w), bg)
        out.paste(img, (0, (w - h) // 2))
    else:
        out = Image.new(img.mode, (h, h), bg)
        out.paste(img, ((h - w) // 2, 0))
    return out


def cases():
    yield "diagram", Image.open("assets/sample_diagram.png")
    rng = np.random.default_rng(0)
    yield "noise_tall", Image.fromarray(rng.integers(0, 256, (250, 150, 3), dtype=np.uint8))
    yield "gray_wide", Image.fromarray(rng.integers(0, 256, (90, 640), dtype=np.uint8), mode="L")
    yield "tiny_rgba", Image.fromarray(rng.integers(0, 256, (7, 5, 4), dtype=np.uint8), mode="RGBA")


def main():
    proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                              image_mean=MEAN, image_std=STD, resample=3, do_center_crop=True)
    out = {}
    for name, img in cases():
        b = io.BytesIO()
        img.save(b, format="PNG")
        out[f"{name}.png"] = torch.tensor(list(b.getvalue()), dtype=torch.uint8)
        rgb = Image.open(io.BytesIO(b.getvalue())).convert("RGB")
        padded = expand2square(rgb, tuple(int(x * 255) for x in MEAN))
        for kind, im in [("pad", padded), ("crop", rgb)]:
            x = proc(im, return_tensors="pt").pixel_values[0].double()
            mean, std = torch.tensor(MEAN).double().view(3, 1, 1), torch.tensor(STD).double().view(3, 1, 1)
            u8 = ((x * std + mean) * 255).round()
            back = ((u8 / 255 - mean) / std).float()
            assert torch.equal(back, proc(im, return_tensors="pt").pixel_values[0]) or (back - x.float()).abs().max() < 1e-5
            out[f"{name}.{kind}"] = u8.to(torch.uint8)
    save_file({k: v.contiguous() for k, v in out.items()}, "tests/fixtures/images.safetensors")
    print("wrote tests/fixtures/images.safetensors:", ", ".join(out))


if __name__ == "__main__":
    main()
