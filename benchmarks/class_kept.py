"""How often SDEdit keeps the class, by t0, with a learned token, the class word, or an empty prompt.

An oracle (the project's small CNN, trained with labels on the *pretraining* half of the digits,
which the experiments never use, with the sweep's rotation and white fill) labels every generated
image; "kept" means the oracle's label is the source's. Tokens are learned by the project's own
textual inversion (`learn_token`) on the k shots of each class drawn as the sweep draws them
(experiment half, seed 0).

    python benchmarks/class_kept.py --model digits --shots 1,2 --m 5 --out result.json

Prints one table (rows: t0; columns: prompt kind per shot count) and the oracle's accuracy.
With `--caption-words N` it measures the model instead: N images per caption word (the made-up
cluster words a `pretrain` model was trained with) from noise, and how class-pure each word is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_dafusion.augment import draw_augmentation, from_model_size, to_model_size  # noqa: E402
from ray_dafusion.classifier import build_model, make_transform  # noqa: E402
from ray_dafusion.config import IngestConfig, InvertConfig, SweepConfig  # noqa: E402
from ray_dafusion.ingest import split_class  # noqa: E402
from ray_dafusion.inversion import learn_token  # noqa: E402
from ray_dafusion.models import load_pipeline  # noqa: E402
from ray_dafusion.perclass import class_seed  # noqa: E402
from ray_dafusion.sample_data import DIGIT_NAMES, digit_halves  # noqa: E402
from ray_dafusion.tokens import class_token  # noqa: E402

SWEEP_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "configs",
                            "sweep_digits.yaml")


def digit_images(indices: np.ndarray, size: int = 32):
    """The digits as the project writes them (dark ink on white, bicubic to `size`), PIL RGB."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for i in indices:
        gray = (255 - d.images[i] / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
        out.append(Image.fromarray(gray).resize((size, size), Image.BICUBIC).convert("RGB"))
    return out, d.target[indices]


def train_oracle(steps: int, augmentation, seed: int = 0):
    """small_cnn on the labelled pretraining half: 90% to train, 10% to report its accuracy; flips,
    rotation and the fill of the corners a rotation uncovers from `augmentation` (the sweep's train
    section: dark digits on white are rotated with white corners, not torchvision's black)."""
    idx = digit_halves()["pretrain"]
    images, labels = digit_images(idx)
    to_tensor = lambda img: torch.from_numpy(np.array(img)).permute(2, 0, 1)  # noqa: E731  uint8 (3, H, W)
    x = torch.stack([to_tensor(i) for i in images])
    y = torch.as_tensor(labels, dtype=torch.long)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    held, fit = order[: len(x) // 10], order[len(x) // 10:]
    torch.manual_seed(seed)
    model = build_model("small_cnn", 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_tf = make_transform(32, True, rotation=augmentation.rotation, hflip=augmentation.hflip,
                              fill=augmentation.fill)
    eval_tf = make_transform(32, False)
    for step in range(steps):
        batch = rng.choice(fit, 64)
        xb = torch.stack([train_tf(x[i]) for i in batch])
        loss = torch.nn.functional.cross_entropy(model(xb), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.stack([eval_tf(x[i]) for i in held])).argmax(1) == y[held]).float().mean().item()
    return model, eval_tf, acc


def oracle_labels(model, eval_tf, images) -> np.ndarray:
    with torch.no_grad():
        xb = torch.stack([eval_tf(torch.from_numpy(np.array(i)).permute(2, 0, 1)) for i in images])
        return model(xb).argmax(1).numpy()


def caption_word_classes(pipe, model_uri: str, oracle, eval_tf, n: int, steps: int, guidance: float):
    """How class-pure the model's own caption words are: `n` images per word from noise (t0 1) with
    "a photo of a <word>", labelled by the oracle. Returns word -> count per oracle class."""
    from PIL import Image

    from ray_dafusion.models import resolve_model

    with open(os.path.join(resolve_model(model_uri), "manifest.json")) as f:
        words = json.load(f)["words"]
    white = Image.new("RGB", (32, 32), "white")  # t0 1: the source is replaced by noise entirely
    out = {}
    for j, word in enumerate(words):
        images = pipe(prompt=[f"a photo of a {word}"] * n, image=[white] * n, strength=1.0, guidance_scale=guidance,
                      num_inference_steps=steps, generator=[torch.Generator().manual_seed(1000 * j + i)
                                                            for i in range(n)]).images
        out[word] = np.bincount(oracle_labels(oracle, eval_tf, images), minlength=10).tolist()
        print(f"{word}: oracle classes {out[word]}", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits")
    p.add_argument("--shots", default="1,2")
    p.add_argument("--m", type=int, default=5, help="images per source, prompt kind and t0")
    p.add_argument("--t0", default="0.25,0.5,0.75,1.0")
    p.add_argument("--steps", type=int, default=50, help="denoising steps for t0 = 1")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--invert-steps", type=int, default=100)
    p.add_argument("--oracle-steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--sweep-config", default=SWEEP_CONFIG,
                   help="the sweep whose train section (rotation, hflip, fill) the oracle trains with")
    p.add_argument("--caption-words", type=int, default=0, metavar="N",
                   help="instead: N images per caption word of a `pretrain` model, from noise, and their oracle classes")
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() // 2))
    started = time.time()

    oracle, eval_tf, oracle_acc = train_oracle(args.oracle_steps, SweepConfig.from_yaml(args.sweep_config).train)
    print(f"oracle: small_cnn on the pretraining half, held-out accuracy {oracle_acc:.3f}", flush=True)
    if args.caption_words:
        pipe = load_pipeline(args.model, device="cpu", torch_dtype=torch.float32)
        counts = caption_word_classes(pipe, args.model, oracle, eval_tf, args.caption_words, args.steps, args.guidance)
        purity = sum(max(c) for c in counts.values()) / sum(sum(c) for c in counts.values())
        pure = sum(max(c) >= 0.9 * sum(c) for c in counts.values())
        print(f"share of images in their word's majority class: {purity:.3f}; words >= 90% one class: "
              f"{pure}/{len(counts)}; classes that are some word's majority: "
              f"{len({int(np.argmax(c)) for c in counts.values()})}/10")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "oracle_accuracy": oracle_acc, "words": counts, "purity": purity,
                           "seconds": round(time.time() - started, 1)}, f, indent=2)
        return 0

    exp = digit_halves()["experiment"]
    images, labels = digit_images(exp)
    keys = {c: [f"{DIGIT_NAMES[c]}/{i:04d}.png" for i in exp[labels == c]] for c in range(10)}
    by_key = {f"{DIGIT_NAMES[labels[j]]}/{i:04d}.png": images[j] for j, i in enumerate(exp)}
    levels = [float(t) for t in args.t0.split(",")]
    table: dict[str, dict[float, float]] = {}
    for k in [int(s) for s in args.shots.split(",")]:
        # the shots exactly as the sweep draws them (val/test as its ingest config: 10 and 30 per class)
        cfg = IngestConfig(examples_per_class=k, seed=args.seed, val_per_class=10, test_per_class=30)
        shots = {c: [by_key[key] for key in split_class(keys[c], {}, cfg)["train"]] for c in range(10)}
        pipe = load_pipeline(args.model, device="cpu", torch_dtype=torch.float32)
        inv = InvertConfig(resolution=32, steps=args.invert_steps, batch_size=4, hflip=False)
        for c in range(10):
            learn_token(pipe, class_token(DIGIT_NAMES[c]), shots[c], inv, seed=class_seed(args.seed, DIGIT_NAMES[c]))
        prompts = {"token": lambda c: f"a photo of a {class_token(DIGIT_NAMES[c])}",
                   "class word": lambda c: f"a photo of a {DIGIT_NAMES[c]}",
                   "empty": lambda c: ""}
        for kind, prompt in prompts.items():
            column = table.setdefault(f"{kind}, {k} shot", {})
            for t0 in levels:
                kept = total = 0
                for c in range(10):
                    for s, source in enumerate(shots[c]):
                        seeds = [draw_augmentation(args.seed, f"{c}-{s}", a, [t0], ["{}"])[0] for a in range(args.m)]
                        out = pipe(prompt=[prompt(c)] * args.m, image=[to_model_size(source, 32, "squash")] * args.m,
                                   strength=t0, guidance_scale=args.guidance, num_inference_steps=args.steps,
                                   generator=[torch.Generator().manual_seed(sd) for sd in seeds]).images
                        out = [from_model_size(img, source.size, "squash") for img in out]
                        kept += int((oracle_labels(oracle, eval_tf, out) == c).sum())
                        total += len(out)
                column[t0] = kept / total
                print(f"{kind:>10}, {k} shot, t0 {t0:g}: {kept}/{total} kept = {kept / total:.2f}", flush=True)
    lines = ["| t0 | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
    for t0 in levels:
        lines.append(f"| {t0:g} | " + " | ".join(f"{table[col][t0]:.2f}" for col in table) + " |")
    print("\n".join(lines))
    result = {"args": vars(args), "oracle_accuracy": oracle_acc, "kept": {c: {str(t): v for t, v in col.items()}
                                                                          for c, col in table.items()},
              "seconds": round(time.time() - started, 1)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"done in {result['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
