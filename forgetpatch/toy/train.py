"""Train the toy world's Stable Diffusion: the VAE first, then the UNet and text encoder together.

Seeded and resumable: a checkpoint (``<out>/checkpoint.pt``, written atomically) holds every
weight, the optimiser, the EMA weights and the RNG states; ``--resume`` continues from it.

What makes this small model learn quickly on a CPU: large shapes on a 32x32 canvas, latents
scaled to unit variance (the VAE's ``scaling_factor`` is measured, as SD's 0.18215 was), min-SNR
loss weighting (gamma 5), AdamW with warm-up and cosine decay, and EMA weights for sampling.

Run:
    python -m forgetpatch.toy.train --steps 20000 --out runs/toy            # start
    python -m forgetpatch.toy.train --steps 20000 --out runs/toy --resume   # continue
    python -m forgetpatch.toy.train --export runs/toy forgetpatch/toy/weights/pipeline

Continue from an export when the checkpoint is gone (fresh optimiser, a new warm-up, the VAE and
its scaling factor kept as shipped):
    python -m forgetpatch.toy.train --steps 22000 --out runs/toy --init-from forgetpatch/toy/weights/pipeline
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import EMAModel, compute_snr
from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm

from forgetpatch.archs import SCHEDULER_CONFIG
from forgetpatch.errors import ForgetPatchError
from forgetpatch.toy import vocab
from forgetpatch.toy.model import (
    ToyModelConfig,
    assemble,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)
from forgetpatch.toy.render import IMAGE_SIZE, render

CHECKPOINT = "checkpoint.pt"
#: The frozen VAE's posterior (mean, std) of every training image, cached for resuming.
LATENTS = "latents.pt"


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (stored in the checkpoint)."""

    steps: int = 20000
    batch_size: int = 64
    lr: float = 6e-4
    warmup: int = 300
    min_lr_ratio: float = 0.05
    ema_decay: float = 0.999
    snr_gamma: float = 5.0
    vae_steps: int = 800
    vae_batch_size: int = 16
    vae_lr: float = 1.5e-3
    vae_kl_weight: float = 1e-7  # relative to a per-pixel mean loss: SD's 1e-6 is on a per-image sum
    dataset_size: int = 20000
    p_empty: float = 0.1
    p_superclass: float = 0.1
    p_partial: float = 0.1
    p_synonym: float = 0.3
    #: Share of prompts written with :data:`vocab.ORDER_TEMPLATES` (0 for the first 18,500 shipped steps).
    p_reorder: float = 0.25
    seed: int = 0
    checkpoint_every_s: float = 240.0


# ---------------------------------------------------------------------------- data


def dataset_scene(i: int) -> tuple[vocab.Scene, int]:
    """The ``i``-th training example: a training (never held-out) scene and its render seed."""
    scenes = vocab.train_scenes()
    return scenes[i % len(scenes)], 1_000_003 + i


def render_dataset(n: int) -> tuple[torch.Tensor, list[vocab.Scene]]:
    """``n`` training images as a float tensor in [-1, 1] (N x 3 x H x W) and their scenes."""
    scenes, images = [], np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i in tqdm(range(n), desc="render", mininterval=5):
        scene, seed = dataset_scene(i)
        scenes.append(scene)
        images[i] = render(scene, seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, scenes


def _word(concept: str, rng: random.Random, p_synonym: float) -> str:
    synonyms = vocab.SYNONYMS.get(concept, ())
    return rng.choice(synonyms) if synonyms and rng.random() < p_synonym else concept


def training_prompt(scene: vocab.Scene, rng: random.Random, cfg: TrainConfig) -> str:
    """A prompt for ``scene``: train template, synonyms mixed in, some superclass, partial and empty."""
    r = rng.random()
    if r < cfg.p_empty:
        return ""
    shape = _word(scene.shape, rng, cfg.p_synonym)
    colour = _word(scene.colour, rng, cfg.p_synonym)
    texture = _word(scene.texture, rng, cfg.p_synonym)
    if r < cfg.p_empty + cfg.p_superclass:
        shape = vocab.SHAPE_SUPERCLASS
    if r > 1.0 - cfg.p_partial:
        template = rng.choice(vocab.PARTIAL_TEMPLATES)
    elif rng.random() < cfg.p_reorder:
        template = rng.choice(vocab.ORDER_TEMPLATES)
    else:
        template = rng.choice(vocab.TRAIN_TEMPLATES)
    return vocab.prompt(scene, template, shape_word=shape, colour_word=colour, texture_word=texture)


# ---------------------------------------------------------------------------- state


class Trainer:
    """All training state; ``save``/``load`` round-trip it through one checkpoint file."""

    def __init__(self, out: Path, cfg: TrainConfig, model_cfg: ToyModelConfig, device: str) -> None:
        self.out, self.cfg, self.model_cfg, self.device = out, cfg, model_cfg, torch.device(device)
        torch.manual_seed(cfg.seed)
        self.tokenizer = build_tokenizer()
        self.vae = build_vae(model_cfg).to(self.device)
        self.text_encoder = build_text_encoder(model_cfg, len(self.tokenizer)).to(self.device)
        self.unet = build_unet(model_cfg).to(self.device)
        self.params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.01)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.ema_unet = EMAModel(self.unet.parameters(), decay=cfg.ema_decay)
        self.ema_text = EMAModel(self.text_encoder.parameters(), decay=cfg.ema_decay)
        self.noise_scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
        self.vae_step = 0
        self.step = 0
        self.scaling_factor: float | None = None
        self.rng = random.Random(cfg.seed)
        self.elapsed_s = 0.0
        #: The step a fresh optimiser started at (0, or where ``init_from`` continued an export).
        self.restart_step = 0
        #: Earlier runs this one continues (``init_from``): their step ranges and prompt mix.
        self.phases: list[dict[str, Any]] = []

    # -- checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "train_config": vars(self.cfg),
            "model_config": self.model_cfg.to_dict(),
            "vae": self.vae.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "unet": self.unet.state_dict(),
            "opt": self.opt.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "ema_unet": self.ema_unet.state_dict(),
            "ema_text": self.ema_text.state_dict(),
            "vae_step": self.vae_step,
            "step": self.step,
            "scaling_factor": self.scaling_factor,
            "rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "elapsed_s": self.elapsed_s,
            "restart_step": self.restart_step,
            "phases": self.phases,
        }

    def save(self) -> Path:
        """Write the checkpoint atomically (temp file + rename), so a kill never corrupts it."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)
        return path

    def load(self, path: Path) -> None:
        """Continue from the checkpoint at ``path``; :class:`ForgetPatchError` when there is none or it is not one."""
        if not path.is_file():
            raise ForgetPatchError(f"no training checkpoint at {path}: give the run folder training wrote (its --out)")
        try:
            s = torch.load(path, map_location=self.device, weights_only=False)
            self._load(s)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise ForgetPatchError(
                f"{path} is not a toy training checkpoint ({type(exc).__name__}: {exc}); give the run folder training "
                "wrote (its --out)"
            ) from None

    def _load(self, s: dict[str, Any]) -> None:
        self.vae.load_state_dict(s["vae"])
        self.text_encoder.load_state_dict(s["text_encoder"])
        self.unet.load_state_dict(s["unet"])
        self.opt.load_state_dict(s["opt"])
        self.vae_opt.load_state_dict(s["vae_opt"])
        self.ema_unet.load_state_dict(s["ema_unet"])
        self.ema_text.load_state_dict(s["ema_text"])
        self.vae_step, self.step = s["vae_step"], s["step"]
        self.scaling_factor = s["scaling_factor"]
        self.rng.setstate(s["rng"])
        torch.set_rng_state(s["torch_rng"])
        self.elapsed_s = s.get("elapsed_s", 0.0)
        self.restart_step = s.get("restart_step", 0)
        self.phases = s.get("phases", [])
        # the run's own prompt mix (an export builds the trainer with a default config)
        self.cfg.p_reorder = s.get("train_config", {}).get("p_reorder", 0.0)

    def init_from(self, directory: Path) -> None:
        """Start from an exported pipeline (its EMA weights) instead of random weights.

        The VAE and its latent scaling factor are taken as exported and not trained again; the
        optimiser is new, so the learning rate warms up again from the exported step on.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        vae = AutoencoderKL.from_pretrained(directory, subfolder="vae", dtype=torch.float32)
        text = CLIPTextModel.from_pretrained(directory, subfolder="text_encoder", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(directory, subfolder="unet", dtype=torch.float32)
        self.vae.load_state_dict(vae.state_dict())
        self.text_encoder.load_state_dict(text.state_dict())
        self.unet.load_state_dict(unet.state_dict())
        self.ema_unet = EMAModel(self.unet.parameters(), decay=self.cfg.ema_decay)
        self.ema_text = EMAModel(self.text_encoder.parameters(), decay=self.cfg.ema_decay)
        self.scaling_factor = float(vae.config.scaling_factor)
        info_path = directory / "training.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        self.vae_step = max(self.cfg.vae_steps, int(info.get("vae_steps", 0)))
        self.step = self.restart_step = int(info.get("unet_steps", 0))
        self.elapsed_s = float(info.get("train_seconds", 0.0))
        # An export from before phases were recorded was trained without reordered prompts.
        self.phases = info.get("phases") or [{"steps": [0, self.step], "p_reorder": 0.0}]
        # New draws of data and noise, not a replay of the first run's.
        self.rng = random.Random(self.cfg.seed + self.step)
        torch.manual_seed(self.cfg.seed + self.step)

    # -- schedules
    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        warm = min(1.0, (step - self.restart_step + 1) / cfg.warmup)
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return warm * cfg.lr * cosine

    # -- phases
    def train_vae(self, images: torch.Tensor, autosave: _Autosave) -> None:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        bar = tqdm(total=cfg.vae_steps, initial=self.vae_step, desc="vae", mininterval=2)
        self.vae.train()
        if self.vae_step < cfg.vae_steps:
            self.scaling_factor = None  # the latent space changes: measure it again afterwards
        while self.vae_step < cfg.vae_steps:
            idx = torch.randint(len(images), (cfg.vae_batch_size,), generator=gen)
            x = images[idx].to(self.device)
            warm = min(1.0, (self.vae_step + 1) / 100)
            for g in self.vae_opt.param_groups:
                g["lr"] = cfg.vae_lr * warm * (0.1 if self.vae_step > 0.8 * cfg.vae_steps else 1.0)
            posterior = self.vae.encode(x).latent_dist
            recon = self.vae.decode(posterior.sample()).sample
            rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
            loss = rec + cfg.vae_kl_weight * posterior.kl().mean()
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.vae_opt.step()
            self.vae_step += 1
            bar.update(1)
            bar.set_postfix(rec=f"{rec.item():.4f}", refresh=False)
            autosave.maybe(self)
        bar.close()
        self.vae.eval()

    @torch.no_grad()
    def encode_dataset(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of every image (computed once; the VAE is frozen afterwards)."""
        means, stds = [], []
        for chunk in tqdm(images.split(512), desc="encode", mininterval=5):
            dist = self.vae.encode(chunk.to(self.device)).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
        mean, std = torch.cat(means), torch.cat(stds)
        if self.scaling_factor is None:
            sample = mean[:4096] + std[:4096] * torch.randn_like(std[:4096])
            self.scaling_factor = float(1.0 / sample.std())
        return mean, std

    def train_unet(
        self, means: torch.Tensor, stds: torch.Tensor, scenes: list[vocab.Scene], autosave: _Autosave
    ):
        cfg = self.cfg
        assert self.scaling_factor is not None
        self.unet.train()
        self.text_encoder.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="unet", mininterval=5)
        smooth = None
        t0 = time.time()
        while self.step < cfg.steps:
            idx = [self.rng.randrange(len(scenes)) for _ in range(cfg.batch_size)]
            prompts = [training_prompt(scenes[i], self.rng, cfg) for i in idx]
            ids = self.tokenizer(
                prompts,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            it = torch.tensor(idx)
            latents = (means[it] + stds[it] * torch.randn_like(stds[it])).to(
                self.device
            ) * self.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(
                0, self.noise_scheduler.config.num_train_timesteps, (len(idx),), device=self.device
            )
            noisy = self.noise_scheduler.add_noise(latents, noise, t)
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step)
            cond = self.text_encoder(ids)[0]
            pred = self.unet(noisy, t, cond).sample
            snr = compute_snr(self.noise_scheduler, t)
            weight = torch.clamp(snr, max=cfg.snr_gamma) / snr
            loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.ema_unet.step(self.unet.parameters())
            self.ema_text.step(self.text_encoder.parameters())
            self.step += 1
            smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{self.lr_at(self.step):.1e}", refresh=False)
            now = time.time()
            self.elapsed_s += now - t0
            t0 = now
            autosave.maybe(self)
        bar.close()

    def export(
        self, directory: Path, dtype: torch.dtype = torch.float16, ema: bool = True
    ) -> StableDiffusionPipeline:
        """Save the EMA (or raw) weights as a ``save_pretrained`` pipeline (safetensors) in ``directory``.

        Weights are stored in fp16 to halve the package size; ``from_pretrained(dtype=torch.float32)``
        upcasts them.
        """
        assert self.scaling_factor is not None, "the VAE has not been trained yet"
        check_export_folder(directory)
        unet = build_unet(self.model_cfg)
        unet.load_state_dict(self.unet.state_dict())
        if ema:
            self.ema_unet.copy_to(unet.parameters())
        text_encoder = build_text_encoder(self.model_cfg, len(self.tokenizer))
        text_encoder.load_state_dict(self.text_encoder.state_dict())
        if ema:
            self.ema_text.copy_to(text_encoder.parameters())
        vae = build_vae(self.model_cfg)
        vae.load_state_dict(self.vae.state_dict())
        vae.register_to_config(scaling_factor=self.scaling_factor)
        pipe = assemble(vae, text_encoder, self.tokenizer, unet)
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # fp16 on CPU is only for storage; loading upcasts
        try:
            pipe.to("cpu", dtype)
            tmp = directory.with_name(directory.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            pipe.save_pretrained(tmp, safe_serialization=True)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        info = {
            "ema": ema,
            "unet_steps": self.step,
            "vae_steps": self.vae_step,
            "train_seconds": round(self.elapsed_s),
            "phases": [
                *self.phases,
                {"steps": [self.restart_step, self.step], "p_reorder": self.cfg.p_reorder},
            ],
        }
        try:
            (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
            shutil.rmtree(directory, ignore_errors=True)  # an earlier export (check_export_folder)
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return pipe


def check_export_folder(directory: Path) -> None:
    """:class:`ForgetPatchError` unless ``directory`` is new or an earlier pipeline export, which an export replaces:
    never a file, a training run or another folder (it would be deleted)."""
    if directory.exists() and not directory.is_dir():
        raise ForgetPatchError(f"{directory} is a file: export into a new folder (or an earlier export)")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / "model_index.json").is_file():
        raise ForgetPatchError(
            f"{directory} holds files that are not a pipeline export, which exporting there would delete: export "
            "into a new folder (or an earlier export)"
        )


def check_device(device: str) -> torch.device:
    """The device ``device`` names, or :class:`ForgetPatchError`: training runs on the CPU or a CUDA GPU."""
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ForgetPatchError(f"--device {device!r} is not a device: give cpu or cuda (cuda:1, ...)") from None
    if chosen.type not in ("cpu", "cuda"):
        raise ForgetPatchError(f"--device {device!r}: the toy world trains on cpu or cuda")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ForgetPatchError("--device cuda: no CUDA device is available here; use --device cpu")
    return chosen


class _Autosave:
    def __init__(self, every_s: float) -> None:
        self.every_s, self.last = every_s, time.time()

    def maybe(self, trainer: Trainer) -> None:
        if time.time() - self.last >= self.every_s:
            trainer.save()
            self.last = time.time()


def train(
    out: Path,
    cfg: TrainConfig,
    resume: bool = False,
    device: str = "cpu",
    init_from: Path | None = None,
) -> Trainer:
    """Run (or continue) training; returns the trainer with its final state saved in ``out``.

    ``init_from`` starts a new run from an exported pipeline (see :meth:`Trainer.init_from`).
    """
    check_device(device)
    ckpt = out / CHECKPOINT
    if resume and not ckpt.exists():
        raise ForgetPatchError(f"--resume: no checkpoint in {out} to continue; drop --resume to start a new run there")
    trainer = Trainer(out, cfg, ToyModelConfig(), device)
    if resume:
        trainer.load(ckpt)
        print(f"resumed from {ckpt}: vae step {trainer.vae_step}, unet step {trainer.step}", flush=True)
    elif ckpt.exists():
        raise ForgetPatchError(f"{ckpt} exists; pass --resume to continue it or choose another --out")
    elif init_from is not None:
        trainer.init_from(init_from)
        print(f"initialised from {init_from}: unet step {trainer.step}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    autosave = _Autosave(cfg.checkpoint_every_s)
    latents_cache = out / LATENTS
    try:
        if trainer.vae_step >= cfg.vae_steps and latents_cache.exists():
            cached = torch.load(latents_cache, map_location="cpu")
            means, stds = cached["mean"].float(), cached["std"].float()
            scenes = [dataset_scene(i)[0] for i in range(len(means))]
        else:
            images, scenes = render_dataset(cfg.dataset_size)
            trainer.train_vae(images, autosave)
            means, stds = trainer.encode_dataset(images)
            del images
            torch.save({"mean": means, "std": stds}, latents_cache.with_suffix(".tmp"))
            os.replace(latents_cache.with_suffix(".tmp"), latents_cache)
        print(f"latent scaling factor {trainer.scaling_factor:.4f}", flush=True)
        trainer.save()
        trainer.train_unet(means, stds, scenes, autosave)
    finally:
        trainer.save()
    return trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=TrainConfig.steps, help="total UNet steps (cosine horizon)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/toy"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    parser.add_argument("--dataset-size", type=int, default=TrainConfig.dataset_size)
    parser.add_argument(
        "--p-reorder",
        type=float,
        default=TrainConfig.p_reorder,
        help="share of reordered prompts (a resumed run keeps its own)",
    )
    parser.add_argument(
        "--export", nargs=2, type=Path, metavar=("RUN", "DIR"), help="export RUN's EMA weights"
    )
    parser.add_argument("--raw", action="store_true", help="with --export: raw weights instead of EMA")
    parser.add_argument(
        "--init-from", type=Path, metavar="DIR", help="start from an exported pipeline's weights"
    )
    args = parser.parse_args(argv)
    if args.export:
        run, directory = args.export
        check_export_folder(directory)  # before the checkpoint loads
        trainer = Trainer(run, TrainConfig(), ToyModelConfig(), "cpu")
        trainer.load(run / CHECKPOINT)
        trainer.export(directory, ema=not args.raw)
        print(f"exported step {trainer.step} to {directory}")
        return
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        vae_steps=args.vae_steps,
        dataset_size=args.dataset_size,
        p_reorder=args.p_reorder,
    )
    train(args.out, cfg, resume=args.resume, device=args.device, init_from=args.init_from)


if __name__ == "__main__":
    main()
