"""The judge: a small CNN that says which shape, colour and texture an image shows, or that it can't tell.

One head per concept kind. The shipped judge (``v2``, ``weights/judge.safetensors`` + ``judge.json``)
is trained on renders degraded the way generated images are (:mod:`forgetpatch.toy.degrade`: wobbly
and rounded outlines, shrunk, cut, faded, blurred shapes, morphs between shapes, two shapes, empty
backgrounds), then fine-tuned with person-labelled generated images mixed in (:class:`PersonSet`).
Its shape head has two outcomes besides the ten shapes: ``"none"`` (no shape drawn) and ``"unclear"``
(no single shape a person could name). Each head gets a temperature (fitted by log-likelihood on
held-out degraded renders) and a threshold on the top probability below which the judge abstains:
chosen on those renders so that at most 2% of what it names is wrong there, except the shape
threshold of the shipped judge, chosen on a person-labelled calibration split
(:func:`choose_shape_threshold`).

:meth:`ToyJudge.classify` is the API: per image ``{"shape", "colour", "texture", "p"}``, ``None`` where it
abstains. :meth:`ToyJudge.predict` is the old top-1 reading (always a concept, never abstains), kept for
comparison, as is the first judge (``load_judge("v1")``, clean renders only, no abstention).

Example:
    >>> from forgetpatch.toy import load_judge, render, Scene
    >>> judge = load_judge()
    >>> judge.classify([render(Scene("ring", "blue", "dots"), seed=0)])[0]["shape"]
    'ring'

Train it again (about 21 + 4 minutes on one CPU thread)::

    python -m forgetpatch.toy.judge --out runs/v2b/judge.safetensors
    python -m forgetpatch.toy.judge --init runs/v2b/judge.safetensors --person tests/data/judge_train \
        --person-labeller 0 --calibration tests/data/judge_calibration --steps 1500 --n-train 12000 --lr 1e-3 \
        --out OUT
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from forgetpatch.errors import ForgetPatchError
from forgetpatch.toy import vocab
from forgetpatch.toy.degrade import (
    COLOUR_LABELS,
    SHAPE_LABELS,
    TEXTURE_LABELS,
    UNCLEAR,
    Verdict,
    degraded_set,
)
from forgetpatch.toy.render import IMAGE_SIZE, render

KINDS: tuple[vocab.Kind, ...] = ("shape", "colour", "texture")
WEIGHTS_DIR = Path(__file__).parent / "weights"
#: Shipped judges by version: ``v2`` (the default, abstains) and ``v1`` (the first, top-1 only).
JUDGES = {"v2": WEIGHTS_DIR / "judge.safetensors", "v1": WEIGHTS_DIR / "judge-v1.safetensors"}
JUDGE_WEIGHTS = JUDGES["v2"]
#: The v2 heads' outcomes: every concept, plus "none" and "unclear" for shapes, "unclear" for colours.
V2_CLASSES: dict[str, tuple[str, ...]] = {"shape": SHAPE_LABELS, "colour": COLOUR_LABELS, "texture": TEXTURE_LABELS}
#: At most this share of what the judge names on held-out degraded renders may be wrong (sets thresholds).
RISK = 0.02


class ToyJudge(nn.Module):
    """Three-headed image classifier over the toy world's shapes, colours and textures.

    Args:
        classes: the outcomes of each head; by default the vocabulary's concepts (the v1 judge).
        temperature, threshold: per kind, the calibration :meth:`classify` uses (1 and 0: none).
    """

    def __init__(
        self,
        width: int = 16,
        image_size: int = IMAGE_SIZE,
        classes: dict[str, tuple[str, ...]] | None = None,
        temperature: dict[str, float] | None = None,
        threshold: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.width, self.image_size = width, image_size
        self.digest: str | None = None
        """Of the weights and settings it was loaded from (:func:`load_judge`): evaluations record it, so that a
        base report judged by another judge is not compared with this one's figures."""
        self.classes = dict(classes) if classes is not None else {k: vocab.concepts_of(k) for k in KINDS}
        self.temperature = {k: 1.0 for k in KINDS} | (temperature or {})
        self.threshold = {k: 0.0 for k in KINDS} | (threshold or {})

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
        return {
            "width": self.width,
            "image_size": self.image_size,
            "classes": self.classes,
            "temperature": self.temperature,
            "threshold": self.threshold,
        }

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per kind for images ``x`` (N x 3 x H x W, values in [0, 1])."""
        h = self.features(x * 2 - 1)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return {k: head(h) for k, head in self.heads.items()}

    # -- inference API
    def _to_tensor(self, images: Any) -> torch.Tensor:
        """``images`` as an N x 3 x S x S float tensor in [0, 1]: 8-bit values (uint8, any container) are divided by
        255; floats must already be in [0, 1] (diffusers' ``output_type="np"`` or ``"pt"``), not 0-255."""
        if isinstance(images, Image.Image):  # one image
            images = [images]
        elif isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3:
            images = images[None]
        if isinstance(images, torch.Tensor):
            x = images
            if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
                x = x.permute(0, 3, 1, 2)
        else:
            images = list(images)
            if not images:
                raise ForgetPatchError("the judge got no images: give at least one")
            arrays = []
            for im in images:
                if isinstance(im, Image.Image):
                    if im.mode not in ("RGB", "L", "P", "1"):
                        raise ForgetPatchError(f"the judge reads RGB images, got a {im.mode} image: .convert('RGB') it")
                    im = im.convert("RGB").resize((self.image_size, self.image_size), Image.BOX)
                arrays.append(np.asarray(im.cpu() if isinstance(im, torch.Tensor) else im))
            shapes = {a.shape for a in arrays}
            if len(shapes) > 1:
                raise ForgetPatchError(f"the judge got images of several shapes {sorted(shapes)}: give one size")
            x = torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))
            if x.ndim == 4 and x.shape[-1] == 3:
                x = x.permute(0, 3, 1, 2)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ForgetPatchError(f"the judge expects N x H x W x 3 images (RGB), got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        else:
            x = x.float()
            if x.numel() and float(x.max()) > 1.0 + 1e-3:
                raise ForgetPatchError(
                    "the judge reads float images in [0, 1] (output_type='np' or 'pt'); these go up to "
                    f"{float(x.max()):.4g}: divide 0-255 values by 255, or give uint8 images"
                )
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="area")
        return x.clamp(0, 1)

    @torch.no_grad()
    def predict_proba(self, images: Any) -> dict[str, np.ndarray]:
        """Calibrated probabilities per kind: ``{kind: N x n_classes}``, columns ordered as ``classes[kind]``.

        ``images``: float array N x H x W x 3 in [0, 1] (diffusers ``output_type="np"``), uint8
        array, a list of PIL images, or a tensor.
        """
        was_training = self.training
        self.eval()
        x = self._to_tensor(images).to(next(self.parameters()).device)
        out = {
            k: torch.softmax(v / self.temperature[k], dim=1).cpu().numpy() for k, v in self(x).items()
        }
        self.train(was_training)
        return out

    def classify(self, images: Any) -> list[Verdict]:
        """What each image shows, or ``None`` per kind where the judge can't tell.

        A kind's label is ``None`` when the most likely outcome is ``"unclear"`` or its probability is
        below the kind's calibrated threshold. The shape may be ``"none"``: no shape drawn.

        Example:
            >>> load_judge().classify(images)[0]  # doctest: +SKIP
            {'shape': 'circle', 'colour': 'red', 'texture': 'plain',
             'p': {'shape': {'circle': 0.97, ...}, 'colour': {...}, 'texture': {...}}}
        """
        proba = self.predict_proba(images)
        out = []
        for i in range(len(proba["shape"])):
            verdict: Verdict = {}
            for k in KINDS:
                top = int(proba[k][i].argmax())
                label = self.classes[k][top]
                confident = proba[k][i, top] >= self.threshold[k] and label != UNCLEAR
                verdict[k] = label if confident else None
            verdict["p"] = {
                k: {c: round(float(p), 4) for c, p in zip(self.classes[k], proba[k][i], strict=True)}
                for k in KINDS
            }
            out.append(verdict)
        return out

    def predict(self, images: Any) -> list[dict[str, str]]:
        """The old top-1 reading: the most likely concept of each kind, never abstaining.

        Example:
            >>> load_judge().predict(images)[0]  # doctest: +SKIP
            {'shape': 'circle', 'colour': 'red', 'texture': 'plain'}
        """
        proba = self.predict_proba(images)
        n = len(next(iter(proba.values())))
        out = []
        for i in range(n):
            row = {}
            for k in KINDS:
                concepts = vocab.concepts_of(k)
                cols = [self.classes[k].index(c) for c in concepts]
                row[k] = concepts[int(proba[k][i, cols].argmax())]
            out.append(row)
        return out


def load_judge(version: str = "v2", *, path: Path | str | None = None, device: str = "cpu") -> ToyJudge:
    """Load a shipped judge by version (``"v2"``, the default, or ``"v1"``) or one saved at ``path``.

    Example:
        >>> load_judge().classify(images)        # doctest: +SKIP
        >>> load_judge("v1").predict(images)     # the first judge, for comparison  # doctest: +SKIP
    """
    if path is None and version not in JUDGES:
        raise ForgetPatchError(f"no judge version {version!r}; shipped: {', '.join(JUDGES)}")
    weights = Path(path) if path is not None else JUDGES[version]
    config_path = weights.with_suffix(".json")
    if not weights.exists() or not config_path.exists():
        raise ForgetPatchError(
            f"no judge weights at {weights}; train them with `python -m forgetpatch.toy.judge --out {weights}`"
        )
    config_bytes, weight_bytes = config_path.read_bytes(), weights.read_bytes()  # each file read once
    config = json.loads(config_bytes)
    classes = {k: tuple(v) for k, v in config["classes"].items()}
    for k in KINDS:
        if not set(vocab.concepts_of(k)) <= set(classes.get(k, ())):
            raise ForgetPatchError(f"{config_path} was trained on other concepts than this toy world's vocabulary")
    judge = ToyJudge(
        width=config["width"],
        image_size=config["image_size"],
        classes=classes,
        temperature=config.get("temperature"),
        threshold=config.get("threshold"),
    )
    judge.load_state_dict(load_safetensors(weight_bytes))
    judge.digest = hashlib.sha256(weight_bytes + config_bytes).hexdigest()[:16]
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


def judge_accuracy(judge: ToyJudge, x: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    proba = judge.predict_proba(x)
    return {k: float((torch.from_numpy(proba[k]).argmax(1) == labels[k]).float().mean()) for k in KINDS}


@dataclass(frozen=True)
class PersonSet:
    """Generated images labelled by people (``tests/data/make_judge_set.py`` makes them): per image the
    shape a person named (or ``"none"`` / ``"unclear"``) and the shape its prompt named."""

    images: np.ndarray
    person: tuple[str, ...]
    prompt_shape: tuple[str, ...]

    @classmethod
    def load(cls, stem: Path | str, *, labeller: int | None = None) -> PersonSet:
        """Read ``<stem>_images.npz`` and ``<stem>_labels.json``, e.g. ``tests/data/judge_test``.

        ``labeller``: take that labeller's labels instead of the settled ``person`` label (the shipped judge
        was fine-tuned on ``judge_train``'s first labeller, before its images were labelled a second time).
        """
        stem = Path(stem)
        rows = json.loads(Path(f"{stem}_labels.json").read_text())["images"]
        with np.load(f"{stem}_images.npz") as data:
            images = data["images"]
        labels = tuple(r["person"] if labeller is None else r["labellers"][labeller] for r in rows)
        return cls(images, labels, tuple(r["prompt_shape"] for r in rows))

    def scores(self, verdicts: Sequence[Verdict]) -> tuple[float, float]:
        """``(agreement, safe)``: the share of person-named images the judge names the same, and of
        person-"unclear" images on which it abstains or names the prompt's shape (nothing wrongly forgotten)."""
        clear = [v["shape"] == p for v, p in zip(verdicts, self.person, strict=True) if p != UNCLEAR]
        safe = [
            v["shape"] in (None, s)
            for v, p, s in zip(verdicts, self.person, self.prompt_shape, strict=True)
            if p == UNCLEAR
        ]
        return float(np.mean(clear)), float(np.mean(safe))


def train_judge(
    steps: int = 5000,
    batch_size: int = 128,
    n_train: int = 40000,
    width: int = 16,
    seed: int = 0,
    workers: int = 2,
    person: PersonSet | None = None,
    init: ToyJudge | None = None,
    lr: float = 2e-3,
) -> ToyJudge:
    """Train a v2 judge on degraded renders (seeded), then calibrate it on other degraded renders.

    ``person``: generated images labelled by people, mixed into every batch (a quarter of it; their
    colour and texture are not labelled, so only the shape head learns from them). ``init``: continue
    from this judge instead of from scratch.
    """
    torch.manual_seed(seed)
    judge = init if init is not None else ToyJudge(width=width, classes=V2_CLASSES)
    images, labels_np = degraded_set(n_train, seed=10_000_000 + seed, workers=workers)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    labels = {k: torch.from_numpy(v) for k, v in labels_np.items()}
    n_person = batch_size // 4 if person is not None else 0
    if person is not None:
        px = torch.from_numpy(person.images).permute(0, 3, 1, 2).float() / 255.0
        py = torch.tensor([judge.classes["shape"].index(p) for p in person.person])
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    judge.train()
    for _ in (bar := tqdm(range(steps), desc="judge", mininterval=5)):
        idx = torch.randint(n_train, (batch_size - n_person,), generator=gen)
        batch = x[idx]
        if person is not None:
            pidx = torch.randint(len(px), (n_person,), generator=gen)
            batch = torch.cat([batch, px[pidx]])
        batch = _augment(batch, gen)
        flip = torch.rand(batch_size, generator=gen) < 0.5  # every shape is mirror-symmetric
        batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
        logits = judge(batch)
        synthetic = slice(0, batch_size - n_person)
        loss = sum(F.cross_entropy(logits[k][synthetic], labels[k][idx]) for k in KINDS)
        if person is not None:
            loss = loss + F.cross_entropy(logits["shape"][batch_size - n_person :], py[pidx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
    calibrate(judge, *degraded_set(8000, seed=20_000_000 + seed, workers=workers))
    return judge.eval()


def choose_shape_threshold(judge: ToyJudge, calibration: PersonSet, safe_min: float = 0.80) -> float:
    """The shape threshold with the best agreement on ``calibration``'s person-named images among those
    keeping at least ``safe_min`` of its person-"unclear" images safe (see :meth:`PersonSet.scores`)."""
    best, best_agreement = 1.0, -1.0
    for t in np.arange(0.30, 1.0, 0.01):
        judge.threshold["shape"] = float(round(t, 2))
        agreement, safe = calibration.scores(judge.classify(calibration.images))
        if safe >= safe_min and agreement > best_agreement:
            best, best_agreement = judge.threshold["shape"], agreement
    judge.threshold["shape"] = best
    return best


def _fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The temperature that maximises the likelihood of labels ``y`` under ``softmax(logits / T)``."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def nll() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(nll)
    return round(float(log_t.detach().exp()), 4)


def calibrate(judge: ToyJudge, images: np.ndarray, labels: dict[str, np.ndarray], risk: float = RISK) -> None:
    """Fit each head's temperature (log-likelihood) and abstention threshold on held-out samples.

    The threshold is the lowest top probability at which, on these samples, at most ``risk`` of
    what the head names (a concept, or "none") is wrong; "unclear" samples named anything count as wrong.
    """
    judge.eval()
    with torch.no_grad():
        logits = judge(judge._to_tensor(images))
    for k in KINDS:
        y = torch.from_numpy(labels[k])
        judge.temperature[k] = _fit_temperature(logits[k], y)
        proba = torch.softmax(logits[k] / judge.temperature[k], dim=1)
        top_p, top = proba.max(dim=1)
        names = [i for i, c in enumerate(judge.classes[k]) if c != UNCLEAR]
        named = torch.isin(top, torch.tensor(names))
        threshold = 1.0
        for t in np.arange(0.30, 1.0, 0.01):
            kept = named & (top_p >= t)
            if kept.sum() and float((top[kept] != y[kept]).float().mean()) <= risk:
                threshold = float(round(t, 2))
                break
        judge.threshold[k] = threshold


def save_judge(judge: ToyJudge, path: Path | str = JUDGE_WEIGHTS) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, path)
    path.with_suffix(".json").write_text(json.dumps(judge.config(), indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the toy world's judge on renders.")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--n-train", type=int, default=40000)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="processes drawing the training images")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--init", type=Path, default=None, help="continue from this judge's weights")
    parser.add_argument(
        "--person", type=Path, default=None, help="person-labelled images to mix in (stem, e.g. tests/data/judge_train)"
    )
    parser.add_argument(
        "--person-labeller",
        type=int,
        default=None,
        help="train on this labeller's labels of --person instead of the settled ones (0: as the shipped judge)",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="person-labelled images the shape threshold is chosen on (stem, e.g. tests/data/judge_calibration)",
    )
    parser.add_argument("--out", type=Path, default=JUDGE_WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    judge = train_judge(
        steps=args.steps,
        n_train=args.n_train,
        width=args.width,
        seed=args.seed,
        workers=args.workers,
        person=PersonSet.load(args.person, labeller=args.person_labeller) if args.person else None,
        init=load_judge(path=args.init) if args.init else None,
        lr=args.lr,
    )
    if args.calibration:
        calibration = PersonSet.load(args.calibration)
        print("shape threshold on the person-labelled calibration set:", choose_shape_threshold(judge, calibration))
        print("calibration set (agreement, safe):", calibration.scores(judge.classify(calibration.images)))
    x, labels = labelled_renders(2000, seed_offset=900_000_000)
    print("clean render accuracy:", judge_accuracy(judge, x, labels))
    print("calibration:", {"temperature": judge.temperature, "threshold": judge.threshold})
    save_judge(judge, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
