"""The judge: a small CNN that says which shape, colour and texture an image shows.

Trained on rendered ground truth (with blur, noise and colour jitter, so generated images read
too), one head per concept kind. Shipped as ``weights/judge.safetensors`` + ``judge.json``.

Example:
    >>> from forgetpatch.toy import load_judge, render, Scene
    >>> judge = load_judge()
    >>> judge.predict([render(Scene("ring", "blue", "dots"), seed=0)])
    [{'shape': 'ring', 'colour': 'blue', 'texture': 'dots'}]

Train it again with ``python -m forgetpatch.toy.judge --steps 3000``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from forgetpatch.errors import ForgetPatchError
from forgetpatch.toy import vocab
from forgetpatch.toy.render import IMAGE_SIZE, render

KINDS: tuple[vocab.Kind, ...] = ("shape", "colour", "texture")
WEIGHTS_DIR = Path(__file__).parent / "weights"
JUDGE_WEIGHTS = WEIGHTS_DIR / "judge.safetensors"
JUDGE_CONFIG = WEIGHTS_DIR / "judge.json"


class Judge(nn.Module):
    """Three-headed image classifier over the toy world's shapes, colours and textures."""

    def __init__(self, width: int = 16, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.width, self.image_size = width, image_size
        self.classes: dict[str, tuple[str, ...]] = {k: vocab.concepts_of(k) for k in KINDS}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        w = width
        self.features = nn.Sequential(
            block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2), block(2 * w, 4 * w)
        )
        self.heads = nn.ModuleDict({k: nn.Linear(8 * w, len(c)) for k, c in self.classes.items()})

    def config(self) -> dict[str, Any]:
        return {"width": self.width, "image_size": self.image_size, "classes": self.classes}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per kind for images ``x`` (N x 3 x H x W, values in [0, 1])."""
        h = self.features(x * 2 - 1)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return {k: head(h) for k, head in self.heads.items()}

    # -- inference API
    def _to_tensor(self, images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            x = images.float()
            if x.ndim == 4 and x.shape[-1] == 3:
                x = x.permute(0, 3, 1, 2)
        else:
            if isinstance(images, np.ndarray) and images.ndim == 3:
                images = images[None]
            arr = np.stack([np.asarray(im) for im in images])
            if arr.dtype == np.uint8:
                arr = arr.astype(np.float32) / 255.0
            x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(0, 3, 1, 2)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ForgetPatchError(f"the judge expects N x H x W x 3 images, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="area")
        return x.clamp(0, 1)

    @torch.no_grad()
    def predict_proba(self, images: Any) -> dict[str, np.ndarray]:
        """Class probabilities per kind: ``{kind: N x n_classes}``, columns ordered as ``classes[kind]``.

        ``images``: float array N x H x W x 3 in [0, 1] (diffusers ``output_type="np"``), uint8
        array, a list of PIL images, or a tensor.
        """
        was_training = self.training
        self.eval()
        x = self._to_tensor(images).to(next(self.parameters()).device)
        out = {k: torch.softmax(v, dim=1).cpu().numpy() for k, v in self(x).items()}
        self.train(was_training)
        return out

    def predict(self, images: Any) -> list[dict[str, str]]:
        """The most likely shape, colour and texture of each image.

        Example:
            >>> load_judge().predict(images)[0]  # doctest: +SKIP
            {'shape': 'circle', 'colour': 'red', 'texture': 'plain'}
        """
        proba = self.predict_proba(images)
        n = len(next(iter(proba.values())))
        return [{k: self.classes[k][int(proba[k][i].argmax())] for k in KINDS} for i in range(n)]


def load_judge(path: Path | str | None = None, device: str = "cpu") -> Judge:
    """Load the shipped judge (or one saved at ``path``, a ``.safetensors`` file)."""
    weights = Path(path) if path is not None else JUDGE_WEIGHTS
    config_path = weights.with_suffix(".json")
    if not weights.exists() or not config_path.exists():
        raise ForgetPatchError(
            f"no judge weights at {weights}; train them with `python -m forgetpatch.toy.judge --out {weights}`"
        )
    config = json.loads(config_path.read_text())
    judge = Judge(width=config["width"], image_size=config["image_size"])
    if {k: tuple(v) for k, v in config["classes"].items()} != judge.classes:
        raise ForgetPatchError(
            f"{config_path} was trained on other concepts than this toy world's vocabulary"
        )
    judge.load_state_dict(load_file(weights))
    return judge.to(device).eval()


# ---------------------------------------------------------------------------- training


def labelled_renders(n: int, seed_offset: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` renders of all scenes (held-out ones included), as [0, 1] tensors, with labels."""
    scenes = vocab.all_scenes()
    rng = np.random.default_rng(seed_offset)
    picks = rng.integers(len(scenes), size=n)
    images = np.stack([render(scenes[p], seed_offset + i) for i, p in enumerate(picks)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    labels = {k: torch.tensor([vocab.concepts_of(k).index(scenes[p].of(k)) for p in picks]) for k in KINDS}
    return x, labels


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Imitate generated images: blur, noise, brightness/colour jitter."""
    n = len(x)
    blur = torch.rand(n, 1, 1, 1, generator=gen) < 0.5
    soft = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where(blur, 0.5 * x + 0.5 * soft, x)
    gain = 1 + 0.08 * torch.randn(n, 3, 1, 1, generator=gen)
    x = x * gain + 0.04 * torch.randn(n, 1, 1, 1, generator=gen)
    x = x + 0.03 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def accuracy(judge: Judge, x: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    proba = judge.predict_proba(x)
    return {k: float((torch.from_numpy(proba[k]).argmax(1) == labels[k]).float().mean()) for k in KINDS}


def train_judge(steps: int = 3000, batch_size: int = 128, n_train: int = 20000, seed: int = 0) -> Judge:
    """Train a judge from scratch on fresh renders (seeded)."""
    torch.manual_seed(seed)
    judge = Judge()
    x, labels = labelled_renders(n_train, seed_offset=10_000_000 + seed * n_train)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    judge.train()
    for _ in (bar := tqdm(range(steps), desc="judge", mininterval=5)):
        idx = torch.randint(n_train, (batch_size,), generator=gen)
        logits = judge(_augment(x[idx], gen))
        loss = sum(F.cross_entropy(logits[k], labels[k][idx]) for k in KINDS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{float(loss):.3f}")
    return judge.eval()


def save_judge(judge: Judge, path: Path | str = JUDGE_WEIGHTS) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, path)
    path.with_suffix(".json").write_text(json.dumps(judge.config(), indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the toy world's judge on renders.")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=JUDGE_WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    judge = train_judge(steps=args.steps, seed=args.seed)
    x, labels = labelled_renders(2000, seed_offset=900_000_000)
    print("held-out render accuracy:", accuracy(judge, x, labels))
    save_judge(judge, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
