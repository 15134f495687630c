#!/usr/bin/env python3
"""NF4 reference from bitsandbytes (CPU): packed bytes, absmax and dequantized values.

Saves to tests/fixtures/nf4.safetensors, for each case <c>: <c>.input (f32 or bf16), <c>.packed (u8,
flattened), <c>.absmax (f32), <c>.dequant_f32 and <c>.dequant_bf16. Cases: a normal [128, 64]
matrix, a bf16 [64, 192] matrix, a matrix with an all-zero block, outliers and values sitting
exactly on the bucket midpoints, and a 100-element vector (a partial last block).

  python3 tools/reference/make_nf4_fixtures.py
"""
import argparse

import bitsandbytes
import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file


def cases():
    g = torch.Generator().manual_seed(0)
    yield "normal", torch.randn(128, 64, generator=g)
    yield "bf16", (torch.randn(64, 192, generator=g) * 0.02).to(torch.bfloat16)
    edge = torch.randn(32, 64, generator=g)
    edge[0] = 0.0  # an all-zero block
    edge[1, 5] = 40.0  # an outlier dominating its block
    code = F.get_4bit_type("nf4", device="cpu")
    mids = (code[:-1] + code[1:]) / 2
    edge[2, :15] = mids  # exactly on the midpoints (scale 1: block max is 1.0 below)
    edge[2, 15] = 1.0
    edge[2, 16:] = 0.0
    edge[3] = -edge[2]
    yield "edge", edge
    yield "tail", torch.randn(100, generator=g)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/nf4.safetensors")
    args = ap.parse_args()
    out = {}
    for name, x in cases():
        q, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
        out[f"{name}.input"] = x
        out[f"{name}.packed"] = q.reshape(-1)
        out[f"{name}.absmax"] = state.absmax.float()
        state.dtype = torch.float32
        out[f"{name}.dequant_f32"] = F.dequantize_4bit(q, state).reshape(-1)
        state.dtype = torch.bfloat16
        out[f"{name}.dequant_bf16"] = F.dequantize_4bit(q, state).reshape(-1)
    out = {k: v.contiguous() for k, v in out.items()}
    save_file(out, args.out, metadata={"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__})
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.dtype} {list(v.shape)}" for k, v in out.items()))


if __name__ == "__main__":
    main()
