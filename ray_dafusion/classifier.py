"""The classifier: model build, transforms, checkpoint format and loading.

A lower floor under ``train``, ``evaluate`` (and any later scorer): each of them builds, feeds
and reloads the classifier only through this module, so the checkpoint layout and the eval
transform are written down once.

A checkpoint is a directory::

    model.pt          the model's state dict (torch.save, loadable with weights_only=True)
    train_state.pt    optimiser and AMP scaler state (for resuming)
    meta.json         arch, num_classes, image_size, classes, method, alpha, epoch, history
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Optional

import numpy as np

from . import storage
from .errors import ConfigError

__all__ = [
    "CHECKPOINT_MODEL",
    "CHECKPOINT_STATE",
    "CHECKPOINT_META",
    "build_model",
    "make_transform",
    "TrainTransform",
    "rotate_batch",
    "seeded_randaugment",
    "eval_transform",
    "decode_uint8",
    "save_checkpoint",
    "load_train_state",
    "load_classifier",
]

CHECKPOINT_MODEL = "model.pt"
CHECKPOINT_STATE = "train_state.pt"
CHECKPOINT_META = "meta.json"


def small_cnn(num_classes: int):
    """A three-block CNN (~100k parameters) for small images such as the 32 px digits: trains in
    seconds on a CPU, so a sweep of many runs fits on a laptop. Its head is `fc`, like a ResNet's."""
    import torch.nn as nn

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()

            def block(cin: int, cout: int, pool: nn.Module) -> list[nn.Module]:
                return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), pool]

            self.features = nn.Sequential(*block(3, 32, nn.MaxPool2d(2)), *block(32, 64, nn.MaxPool2d(2)),
                                          *block(64, 128, nn.AdaptiveAvgPool2d(1)))
            self.fc = nn.Linear(128, num_classes)

        def forward(self, x):  # (B, 3, S, S) -> (B, num_classes)
            return self.fc(self.features(x).flatten(1))

    return SmallCNN()


def build_model(arch: str, num_classes: int, weights: str = "none", backbone: str = "finetune",
                endpoint_url: Optional[str] = None):
    """A torchvision ResNet (or `small_cnn`) with a `num_classes` head; linear_probe freezes all but `fc`."""
    import torch
    import torchvision

    if arch == "small_cnn":
        if weights == "imagenet":
            raise ConfigError("config field 'weights': there are no ImageNet weights for arch small_cnn")
        model = small_cnn(num_classes)
        if weights != "none":
            _load_state_dict_file(model, weights, endpoint_url)
        if backbone == "linear_probe":
            for name, p in model.named_parameters():
                p.requires_grad = name.startswith("fc.")
        return model
    ctor = getattr(torchvision.models, arch)
    if weights == "imagenet":
        try:
            model = ctor(weights="DEFAULT")
        except Exception as exc:  # offline machines end up here
            raise ConfigError(
                f"config field 'weights': torchvision could not fetch ImageNet weights for {arch} "
                f"({type(exc).__name__}: {exc}); on an offline machine pass a state-dict file "
                "(local or s3://) or weights: none"
            ) from None
    else:
        model = ctor(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    if weights not in ("none", "imagenet"):
        _load_state_dict_file(model, weights, endpoint_url)
    if backbone == "linear_probe":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("fc.")
    return model


def _load_state_dict_file(model, uri: str, endpoint_url: Optional[str]) -> None:
    import torch

    try:
        data = storage.read_bytes(uri, endpoint_url)
    except FileNotFoundError:
        raise ConfigError(f"config field 'weights': no such state-dict file {uri}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"config field 'weights': {uri} is not a torch state dict loadable with "
                          f"weights_only=True ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"config field 'weights': {uri} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    # A head trained for other classes is dropped: the new fc starts fresh.
    for key in ("fc.weight", "fc.bias"):
        if key in state and state[key].shape != own[key].shape:
            del state[key]
    bad_shape = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.startswith("fc.")]
    unexpected = [k for k in state if k not in own]
    if bad_shape or missing or unexpected:
        raise ConfigError(
            f"config field 'weights': {uri} does not match the {type(model).__name__} architecture: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {bad_shape[:5]} "
            "(is `arch` right?)"
        )
    model.load_state_dict(state, strict=False)


def make_transform(image_size: int, train: bool, rotation: float = 15.0, hflip: bool = True,
                   randaugment: bool = False, fill: int = 0):
    """Transform of a uint8 (3, H, W) tensor -> float (3, S, S) normalised to [-1, 1]: resize, then
    for training a random flip, rotation and optional RandAugment. `fill` is the grey level of the
    corners that a rotation or shear uncovers."""
    if train:
        return TrainTransform(image_size, rotation, hflip, randaugment, fill)
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize((image_size, image_size), antialias=True), *_to_float()])


def _to_float() -> list[Any]:
    import torch
    from torchvision.transforms import v2

    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]


def seeded_randaugment(randaugment: Any, image: Any, generator: Any) -> Any:
    """torchvision's `v2.RandAugment` of one uint8 image with its draws taken from `generator`:
    the same image as `torch.manual_seed(s); randaugment(image)` for a generator seeded with s
    (tests/test_train.py checks), without touching torch's global generator, so decoding threads
    need no lock. Its ops are deterministic given the op and magnitude; only these draws are random.
    """
    import torch

    space = randaugment._AUGMENTATION_SPACE
    names = tuple(space)
    height, width = image.shape[-2:]
    for _ in range(randaugment.num_ops):  # the draws of RandAugment.forward, in its order
        name = names[int(torch.randint(len(names), (), generator=generator))]
        magnitudes_fn, signed = space[name]
        magnitudes = magnitudes_fn(randaugment.num_magnitude_bins, height, width)
        magnitude = 0.0
        if magnitudes is not None:
            magnitude = float(magnitudes[randaugment.magnitude])
            if signed and torch.rand((), generator=generator) <= 0.5:
                magnitude *= -1
        image = randaugment._apply_image_or_video_transform(image, name, magnitude,
                                                            interpolation=randaugment.interpolation,
                                                            fill=randaugment._fill)
    return image


class TrainTransform:
    """The training transform, whose flip and rotation draw from a generator passed per call.

    torchvision's random transforms draw from torch's one global generator; seeding that per row
    needs a lock around every call, which serialises the decoding threads (on a GPU node the
    stream then feeds one core's worth of images). Here each row's draws come from its own
    `torch.Generator`, so threads transform rows in parallel and a row's result depends only on
    its seed. RandAugment's draws (op and sign) come from a generator seeded from the row's, the
    ops themselves are torchvision's (`seeded_randaugment`). Without a generator, the global one is used.
    """

    def __init__(self, image_size: int, rotation: float, hflip: bool, randaugment: bool, fill: int) -> None:
        from torchvision.transforms import v2

        self.resize = v2.Resize((image_size, image_size), antialias=True)
        self.rotation, self.hflip, self.fill = float(rotation), hflip, fill
        self.randaugment = v2.RandAugment(fill=fill) if randaugment else None
        self.post = v2.Compose(_to_float())

    def __call__(self, image: Any, generator: Any = None) -> Any:
        import torch
        from torchvision.transforms.v2 import functional as F

        x = self.resize(image)
        if self.hflip and float(torch.rand(1, generator=generator)) < 0.5:
            x = F.horizontal_flip(x)
        if self.rotation > 0:
            angle = float(torch.empty(1).uniform_(-self.rotation, self.rotation, generator=generator))
            x = F.rotate(x, angle, fill=float(self.fill))
        if self.randaugment is not None:
            if generator is None:
                x = self.randaugment(x)
            else:
                seed = int(torch.randint(2**62, (1,), generator=generator))
                x = seeded_randaugment(self.randaugment, x, torch.Generator().manual_seed(seed))
        return self.post(x)

    def many(self, images: list, generators: list) -> Any:
        """``torch.stack([self(image, g) for image, g in zip(images, generators)])``, the same
        tensor made as one batch: each row draws its flip and angle from its own generator as in
        a call, then one grid sample rotates every row (per-image calls cost more in dispatch than
        in arithmetic on small images). With RandAugment (per-image ops) rows go one by one."""
        import torch

        if not images:
            return torch.empty(0, 3, *self.resize.size)
        if self.randaugment is not None:
            return torch.stack([self(image, g) for image, g in zip(images, generators)])
        return self.finish(*self.draw(images, generators))

    @property
    def splits(self) -> bool:
        """Whether `draw` + `finish` make this transform (everything but RandAugment, which runs per
        image between the rotation and the float conversion)."""
        return self.randaugment is None

    def draw(self, images: list, generators: list) -> tuple:
        """The first half of `many`: every image resized, stacked as uint8, and each row's random
        draws, in `__call__`'s order: (uint8 (B, 3, S, S), flips (B,) bool, angles (B,) degrees)."""
        import torch

        x = torch.stack([self.resize(image) for image in images]) if images else \
            torch.empty(0, 3, *self.resize.size, dtype=torch.uint8)
        flips, angles = np.zeros(len(images), dtype=bool), np.zeros(len(images))
        for i, generator in enumerate(generators):
            if self.hflip:
                flips[i] = float(torch.rand(1, generator=generator)) < 0.5
            if self.rotation > 0:
                angles[i] = float(torch.empty(1).uniform_(-self.rotation, self.rotation, generator=generator))
        return x, flips, angles

    def finish(self, x: Any, flips: np.ndarray, angles: np.ndarray) -> Any:
        """The second half, on whatever device `x` is (the training step's GPU, or the decoding
        thread's CPU): flip, rotate and convert to normalised float."""
        import torch

        if flips.any():
            rows = torch.as_tensor(np.flatnonzero(flips), device=x.device)
            x = x.index_copy(0, rows, x[rows].flip(-1))  # a new tensor: the caller's batch is left as it was
        if self.rotation > 0 and len(x):
            x = rotate_batch(x, [float(a) for a in angles], float(self.fill))
        return self.post(x)


def rotate_batch(images: Any, angles: list[float], fill: float) -> Any:
    """Rotate each uint8 image of (B, C, H, W) by its angle (degrees, counter-clockwise) about its
    centre, nearest neighbour, uncovered pixels set to `fill`: torchvision's `rotate` of each image,
    pixel for pixel on the CPU (tests/test_train.py checks); on a GPU the same up to a rare pixel
    whose source lies on a rounding tie. On the device of `images`.

    One `grid_sample` for the batch, on a single channel that holds each pixel's flat index (+1;
    0 where the zero padding shows through), so nearest sampling picks exactly the source pixel
    torchvision's grid would; the uint8 channels are then gathered by that index. Sampling an
    index map instead of the image as float with an "inside" channel is up to ~4x cheaper per row
    (64 rows of 224 px in one call; less on fewer rows).
    """
    import torch
    import torch.nn.functional as F
    from torchvision.transforms.v2 import functional as TF

    b, c, h, w = images.shape
    device = images.device
    rows = []
    for angle in angles:  # torchvision's inverse matrix for rotate(angle): angle taken mod 360, then negated
        rot = math.radians(-(angle % 360))
        rows.append([math.cos(rot), math.sin(rot), 0.0, -math.sin(rot), math.cos(rot), 0.0])
    theta = torch.tensor(rows, dtype=torch.float32, device=device).view(b, 2, 3)
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device)
    base = torch.stack([xs.expand(h, w), ys.unsqueeze(-1).expand(h, w), torch.ones(h, w, device=device)], -1)
    scaled = theta.transpose(1, 2).div(torch.tensor([0.5 * w, 0.5 * h], device=device))  # to grid_sample's [-1, 1]
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(scaled).view(b, h, w, 2)
    index = torch.arange(1, h * w + 1, dtype=torch.float32, device=device).view(1, 1, h, w).expand(b, 1, h, w)
    source = F.grid_sample(index, grid, mode="nearest", padding_mode="zeros", align_corners=False)  # exact < 2**24
    source = source.view(b, 1, h * w).long().expand(b, c, h * w)
    fill_pixel = torch.tensor(float(fill), device=device).round().to(images.dtype).expand(b, c, 1)
    x = torch.cat([fill_pixel, images.reshape(b, c, h * w)], 2).gather(2, source).view(b, c, h, w)
    for i, angle in enumerate(angles):  # torchvision turns quarter turns exactly, without a grid
        if angle % 90 == 0:
            x[i] = TF.rotate(images[i], angle, fill=fill)
    return x


def eval_transform(meta: dict[str, Any]):
    """The transform a checkpoint was validated with (squash to its image size, normalise)."""
    return make_transform(int(meta["image_size"]), train=False)


def decode_uint8(data: bytes):
    """Encoded PNG/JPEG bytes -> uint8 tensor (3, H, W) RGB."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def save_checkpoint(directory: str, model_state: dict, train_state: dict, meta: dict[str, Any]) -> None:
    """Write one checkpoint directory (local; Ray Train uploads it)."""
    import torch

    torch.save(model_state, os.path.join(directory, CHECKPOINT_MODEL))
    torch.save(train_state, os.path.join(directory, CHECKPOINT_STATE))
    with open(os.path.join(directory, CHECKPOINT_META), "w") as f:
        json.dump(meta, f, indent=2)


def load_train_state(directory: str, device: Any) -> tuple[dict, dict, dict[str, Any]]:
    """(model state dict, train state, meta) of a local checkpoint directory, for resuming."""
    import torch

    model_state = torch.load(os.path.join(directory, CHECKPOINT_MODEL), map_location=device, weights_only=True)
    train_state = torch.load(os.path.join(directory, CHECKPOINT_STATE), map_location=device, weights_only=True)
    with open(os.path.join(directory, CHECKPOINT_META)) as f:
        meta = json.load(f)
    return model_state, train_state, meta


def load_classifier(checkpoint_uri: str, endpoint_url: Optional[str] = None):
    """(model in eval mode on CPU, meta dict) from a checkpoint written by `train` (local or s3://)."""
    import torch

    meta = storage.read_json(storage.join(checkpoint_uri, CHECKPOINT_META), endpoint_url)
    model = build_model(meta["arch"], int(meta["num_classes"]), "none")
    data = storage.read_bytes(storage.join(checkpoint_uri, CHECKPOINT_MODEL), endpoint_url)
    model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return model.eval(), meta
