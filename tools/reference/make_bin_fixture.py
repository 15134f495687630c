"""PyTorch .bin checkpoints of the tiny CLIP, for the tests of reading repositories that carry
no safetensors (openai/clip-vit-large-patch14-336 was published with pytorch_model.bin).

Writes, from <model-dir>/vision/model.safetensors (`gemmaclip init --preset tiny --seed 0`):
  tests/fixtures/clip_bin/pytorch_model.bin                    one torch.save archive (zip format)
  tests/fixtures/clip_bin_sharded/pytorch_model-0000{1,2}-of-00002.bin + pytorch_model.bin.index.json
                                                               the same tensors in two shards, as
                                                               transformers' save_pretrained shards them
"""

import argparse
import json
import pathlib
from collections import OrderedDict

import torch
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True, help="output of `gemmaclip init --preset tiny --seed 0`")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[2] / "tests/fixtures"))
    args = ap.parse_args()

    state = load_file(str(pathlib.Path(args.model_dir) / "vision/model.safetensors"))
    names = sorted(state)
    out = pathlib.Path(args.out)

    single = out / "clip_bin"
    single.mkdir(parents=True, exist_ok=True)
    # torch.save's default (since 1.6) is the zip archive; the state dict is an OrderedDict as
    # Module.state_dict() returns it
    torch.save(OrderedDict((n, state[n]) for n in names), single / "pytorch_model.bin")

    sharded = out / "clip_bin_sharded"
    sharded.mkdir(parents=True, exist_ok=True)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate([names[:half], names[half:]], start=1):
        shard = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({n: state[n] for n in part}, sharded / shard)
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")

    sizes = {p.relative_to(out): p.stat().st_size for p in [*single.iterdir(), *sharded.iterdir()]}
    for p, s in sorted(sizes.items()):
        print(f"{s:>9}  {p}")
    print(f"{len(names)} tensors, torch {torch.__version__}")


if __name__ == "__main__":
    main()
