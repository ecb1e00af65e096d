"""Apply-time and inference-overhead benchmark of the loader on a full-size SD 1.5 architecture (CPU).

Builds SD 1.5 with random weights (forgetpatch.testing.published_pipeline), saves it to a
temporary folder and measures, in one run:

* apply time / pipeline load time (load = ``StableDiffusionPipeline.from_pretrained`` of that folder;
  apply = ``forgetpatch.apply(pipe, patch_folder)``, i.e. reading, checking fingerprints and injecting);
* inference time patched / base for: fused, unfused with 1 and 3 patches, key-step gated (1 patch).

Patches are random rank-4 LoRAs on the cross-attention keys/values (``--style xattn``, the shape of
ESD-x / UCE / MACE patches) or on every Linear/Conv of the UNet (``--style full``, ESD-u-like).
Inference is timed on the denoising loop (``output_type="latent"``), median of ``--repeats`` runs,
configurations interleaved so that load from other processes spreads evenly; both the process's
CPU time (robust on a shared machine) and wall time are reported.

Targets: apply <= 5% of load, fused <= 1.01x, unfused 3 patches <= 1.10x, gated <= 1.05x.

    python benchmarks/apply.py                 # a few minutes on 2 CPU cores
    python benchmarks/apply.py --style full --size 128 --steps 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from torch import nn

import forgetpatch
from forgetpatch.format import KeyStepRange, build_patch
from forgetpatch.testing import published_pipeline


def target_modules(pipe, style: str) -> list[str]:
    def wanted(name: str, module: nn.Module) -> bool:
        if style == "xattn":
            return name.endswith(("attn2.to_k", "attn2.to_v"))
        return isinstance(module, (nn.Linear, nn.Conv2d))

    return [f"unet.{name}" for name, module in pipe.unet.named_modules() if wanted(name, module)]


def make_patch(pipe, paths: list[str], seed: int, rank: int, key_steps=None):
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for path in paths:
        w = pipe.unet.get_submodule(path.removeprefix("unet.")).weight
        factors[path] = (
            0.01 * torch.randn(rank, w[0].numel(), generator=g),
            torch.randn(w.shape[0], rank, generator=g),
        )
    return build_patch(pipe, factors, name=f"bench{seed}", method="random", concepts=[f"c{seed}"],
                       key_steps=key_steps, lineage=[])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--style", choices=["xattn", "full"], default="xattn")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared machine, 1 avoids OpenMP oversubscription stalls

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("building SD 1.5 with random weights and saving it ...", flush=True)
        published_pipeline("sd15", seed=0).save_pretrained(tmp / "sd15")

        t0 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(tmp / "sd15", local_files_only=True)
        load_s = time.perf_counter() - t0
        pipe.set_progress_bar_config(disable=True)

        paths = target_modules(pipe, args.style)
        gated_range = [KeyStepRange(start=0.0, end=0.5)]
        folders = []
        for seed in range(3):
            patch = make_patch(pipe, paths, seed, args.rank, key_steps=gated_range if seed == 0 else None)
            folders.append(patch.save(tmp / f"patch{seed}"))

        def timed_apply(**kwargs) -> tuple[float, float]:
            applies, removes = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                forgetpatch.apply(pipe, folders[0], **kwargs)
                applies.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                forgetpatch.remove(pipe)
                removes.append(time.perf_counter() - t0)
            return statistics.median(applies), statistics.median(removes)

        apply_s, remove_s = timed_apply()
        fused_apply_s, fused_remove_s = timed_apply(fuse=True)
        print(
            f"pipeline load {load_s:.2f} s; {len(paths)} modules per patch ({args.style}, rank {args.rank})"
        )
        print(f"apply unfused {apply_s:.3f} s (remove {remove_s:.3f} s), fused {fused_apply_s:.3f} s "
              f"(remove {fused_remove_s:.3f} s)")  # fmt: skip
        print(f"apply / load            {apply_s / load_s:7.2%} unfused, {fused_apply_s / load_s:.2%} fused "
              "(target <= 5%)", flush=True)  # fmt: skip

        def setup(config: str) -> None:
            forgetpatch.remove(pipe)
            if config == "fused":
                forgetpatch.apply(pipe, folders[0], fuse=True)
            elif config == "unfused x1":
                forgetpatch.apply(pipe, folders[0])
            elif config == "unfused x3":
                forgetpatch.apply(pipe, folders)
            elif config == "gated x1":
                forgetpatch.apply(pipe, folders[0], key_steps=True)

        def run() -> tuple[float, float]:
            g = torch.Generator().manual_seed(0)
            wall, cpu = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                pipe("a photo of a cat", num_inference_steps=args.steps, height=args.size, width=args.size,
                     output_type="latent", generator=g)  # fmt: skip
            return time.perf_counter() - wall, time.process_time() - cpu

        configs = ["base", "fused", "unfused x1", "unfused x3", "gated x1"]
        times: dict[str, list[tuple[float, float]]] = {c: [] for c in configs}
        for c in configs:  # warm-up
            setup(c)
            run()
        for _ in range(args.repeats):
            for c in configs:
                setup(c)
                times[c].append(run())
        forgetpatch.remove(pipe)

    wall = {c: statistics.median(t[0] for t in v) for c, v in times.items()}
    cpu = {c: statistics.median(t[1] for t in v) for c, v in times.items()}
    print(f"\ninference: {args.size}px, {args.steps} steps, CFG, threads={torch.get_num_threads()}, "
          f"median of {args.repeats}; CPU time is the process's own (robust to other load), wall is elapsed")  # fmt: skip
    print(f"base                    cpu {cpu['base']:.2f} s   wall {wall['base']:.2f} s")
    targets = {"fused": 1.01, "unfused x1": None, "unfused x3": 1.10, "gated x1": 1.05}
    for c, target in targets.items():
        note = f"(target <= {target:.2f}x)" if target else ""
        print(
            f"{c:<12} / base       cpu {cpu[c] / cpu['base']:6.3f}x   wall {wall[c] / wall['base']:6.3f}x  {note}"
        )


if __name__ == "__main__":
    main()
