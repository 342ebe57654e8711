"""A sheet of what a pretrained model draws: one row per caption word (and one for the empty
prompt), txt2img as img2img at strength 1.0 from a white image.

    python benchmarks/model_samples.py --model digits --out docs/images/digits-samples.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_dafusion.models import load_pipeline, resolve_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits")
    p.add_argument("--per-row", type=int, default=8)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scale", type=int, default=2, help="each 32 px image is drawn this many times larger")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    local = resolve_model(args.model)
    with open(os.path.join(local, "manifest.json")) as f:
        words = json.load(f)["words"]
    pipe = load_pipeline(local, device="cpu", torch_dtype=torch.float32)
    size = pipe.vae.config.sample_size
    rows = [(w, f"a photo of a {w}") for w in words] + [("(empty)", "")]
    cell, label = size * args.scale, 60
    sheet = Image.new("RGB", (label + args.per_row * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, prompt) in enumerate(rows):
        images = pipe(prompt=[prompt] * args.per_row, image=[Image.new("RGB", (size, size), "white")] * args.per_row,
                      strength=1.0, guidance_scale=args.guidance, num_inference_steps=args.steps,
                      generator=[torch.Generator().manual_seed(1000 * r + i) for i in range(args.per_row)]).images
        draw.text((4, r * cell + cell // 2 - 5), name, fill="black", font=ImageFont.load_default())
        for i, image in enumerate(images):
            sheet.paste(image.resize((cell, cell), Image.NEAREST), (label + i * cell, r * cell))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sheet.save(args.out)
    print(f"{len(rows)} rows x {args.per_row} samples -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
