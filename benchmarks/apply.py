"""Apply-time and inference-overhead benchmark of the loader on a full-size SD 1.5 architecture (CPU).

Builds SD 1.5 with random weights (forgetpatch.testing.published_pipeline), saves it to a
temporary folder and measures, in one run:

* **load**: ``StableDiffusionPipeline.from_pretrained`` of that folder (hot: the files are in the page cache),
  median of ``--loads`` loads;
* **apply**: ``forgetpatch.apply(pipe, patch_folder)`` (reading and verifying the patch, checking the base
  fingerprints, injecting), unfused and fused, median of ``--repeats``;
* **switch**: one patch on, ``remove`` it and ``apply`` another, from its folder or already read with
  ``forgetpatch.load`` (what a server swapping safety patches does);
* **inference** patched / base for: fused, unfused with 1 and 3 patches, key-step gated (1 patch);
* **layer cost** (``--layer-cost``): the time of one call of a bare cross-attention key ``Linear`` (768 -> 320, 2 x 77
  tokens) against the same layer wrapped by peft's LoRA with 1 and 3 adapters. Where the UNet's run is bound by the
  host launching its kernels (SD 1.5 in fp16 on a large GPU), this per-call cost is what an unfused patch adds.

Patches are random rank-4 LoRAs on the cross-attention keys/values (``--style xattn``, the shape of
ESD-x / UCE / MACE patches) or on every Linear/Conv of the UNet (``--style full``, ESD-u-like).

How the inference ratios are kept honest: every round runs each configuration once, in a fresh random order
(seeded), after a garbage collection, and each configuration's time is divided by the base time *of the same
round*. The median of those per-round ratios is reported with their spread (min-max). A second, unpatched
configuration ("base again") is in every round as a control: its ratio shows what "no difference" looks like
on this machine. (A fixed order once showed fused / base 1.25x while fused equalled base when timed alone: the
configuration right after the base run was slowed by the position, not by the patch.) CPU time is the process's
own (robust to other load); wall time is reported beside it.

On a GPU (``--device cuda``) the load is what a GPU user does, ``from_pretrained(..., dtype=...)`` then
``.to("cuda")``, and every timing waits for the GPU (``torch.cuda.synchronize``).

After the apply figures it prints what peft alone takes to build the patch's LoRA layers (``--style xattn``): on a
CPU that is above 5% of a hot load by itself, so there the apply target cannot be met while patches are peft adapters.

Targets: apply <= 5% of load, switch <= 50 ms, fused <= 1.01x, unfused 3 patches <= 1.10x, gated <= 1.05x.

    python benchmarks/apply.py --threads 1                 # about 6 minutes on 2 CPU cores
    python benchmarks/apply.py --device cuda --dtype float16 --size 512 --steps 20 --repeats 15 --layer-cost
    python benchmarks/apply.py --style full --size 128 --steps 4
"""

from __future__ import annotations

import argparse
import gc
import random
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


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _spread(values: list[float], unit: str = "ms", scale: float = 1000.0) -> str:
    return f"{_median(values) * scale:.1f} {unit} (min {min(values) * scale:.1f}, max {max(values) * scale:.1f})"


def wait(device: str) -> None:
    """Wait for the GPU's queued work (nothing to wait for on a CPU), so that a timer reads what was done."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def layer_cost(device: str, dtype: torch.dtype, calls: int = 3000) -> dict[str, float]:
    """Microseconds per call of a bare ``Linear`` and of peft's LoRA ``Linear`` around it with 1 and 3 rank-4
    adapters (built as :func:`forgetpatch.loader.adapters.inject` builds them)."""
    from peft.tuners.lora import Linear as LoraLinear

    from forgetpatch.loader.adapters import lora_config

    x = torch.randn(2, 77, 768, device=device, dtype=dtype)

    def per_call(layer: nn.Module) -> float:
        for _ in range(200):
            layer(x)
        wait(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            layer(x)
        wait(device)
        return (time.perf_counter() - t0) / calls * 1e6

    out = {}
    with torch.inference_mode():
        out["bare"] = per_call(nn.Linear(768, 320, bias=False).to(device, dtype))
        config = lora_config({"to_k": 4})
        for k in (1, 3):
            layer = LoraLinear(nn.Linear(768, 320, bias=False), "a0", config=config, r=4, lora_alpha=4)
            for i in range(1, k):
                layer.update_layer(f"a{i}", 4, lora_alpha=4, config=config)
            layer.to(device, dtype).set_adapter([f"a{i}" for i in range(k)])
            out[f"lora x{k}"] = per_call(layer)
    return out


def peft_layers_ms(pipe, paths: list[str], rank: int, repeats: int = 5) -> float:
    """Milliseconds peft takes to build its LoRA layers around ``paths`` alone (what :func:`inject` asks of it, nothing
    attached to the pipeline), median of ``repeats``: the part of ``apply`` forgetpatch cannot make cheaper while a
    patch's adapter is a peft adapter."""
    from peft.tuners.lora import Linear as LoraLinear

    from forgetpatch.loader.adapters import lora_config

    bases = [pipe.unet.get_submodule(path.removeprefix("unet.")) for path in paths]
    config = lora_config({path: rank for path in paths})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for base in bases:
            LoraLinear(base, "a0", config=config, r=rank, lora_alpha=rank)
        times.append(time.perf_counter() - t0)
    return _median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--style", choices=["xattn", "full"], default="xattn")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="inference rounds (each runs every configuration)")
    parser.add_argument("--apply-repeats", type=int, default=15, help="timed apply / remove / switch cycles")
    parser.add_argument("--loads", type=int, default=3, help="timed pipeline loads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the configurations' order")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-inference", action="store_true", help="time load, apply and switch only")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--layer-cost", action="store_true", help="also time one LoRA-wrapped layer's call")
    args = parser.parse_args()
    if low := [n for n in ("rank", "size", "steps", "repeats", "apply_repeats", "loads") if getattr(args, n) < 1]:
        parser.error(f"--{low[0].replace('_', '-')} must be at least 1")
    if args.size % 8:
        parser.error(f"--size {args.size}: give a multiple of 8 (the latent is size / 8)")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, ValueError) as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared machine, 1 avoids OpenMP oversubscription stalls

    if args.layer_cost:
        cost = layer_cost(args.device, dtype)
        print(f"one call on {args.device} ({args.dtype}): bare Linear {cost['bare']:.1f} us, with peft's LoRA and "
              f"1 adapter {cost['lora x1']:.1f} us, 3 adapters {cost['lora x3']:.1f} us", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("building SD 1.5 with random weights and saving it ...", flush=True)
        published_pipeline("sd15", seed=0).save_pretrained(tmp / "sd15")

        loads = []
        for _ in range(args.loads):
            pipe = None
            gc.collect()
            t0 = time.perf_counter()
            pipe = StableDiffusionPipeline.from_pretrained(tmp / "sd15", local_files_only=True, dtype=dtype)
            pipe.to(args.device)
            wait(args.device)
            loads.append(time.perf_counter() - t0)
            pipe.set_progress_bar_config(disable=True)
        load_s = _median(loads)

        paths = target_modules(pipe, args.style)
        gated_range = [KeyStepRange(start=0.0, end=0.5)]
        folders = []
        for seed in range(3):
            patch = make_patch(pipe, paths, seed, args.rank, key_steps=gated_range if seed == 0 else None)
            folders.append(patch.save(tmp / f"patch{seed}"))

        def timed(action) -> float:
            gc.collect()
            wait(args.device)
            t0 = time.perf_counter()
            action()
            wait(args.device)
            return time.perf_counter() - t0

        read = [forgetpatch.load(f) for f in folders[:2]]  # a server keeps its patches read and verified
        applies, removes, fused_applies, fused_removes, switches, read_switches = [], [], [], [], [], []
        forgetpatch.apply(pipe, folders[0])  # warm-up: imports, first allocations
        forgetpatch.remove(pipe)
        for _ in range(args.apply_repeats):
            applies.append(timed(lambda: forgetpatch.apply(pipe, folders[0])))
            switches.append(timed(lambda: (forgetpatch.remove(pipe), forgetpatch.apply(pipe, folders[1]))))
            removes.append(timed(lambda: forgetpatch.remove(pipe)))
            fused_applies.append(timed(lambda: forgetpatch.apply(pipe, folders[0], fuse=True)))
            fused_removes.append(timed(lambda: forgetpatch.remove(pipe)))
            forgetpatch.apply(pipe, read[0])
            read_switches.append(timed(lambda: (forgetpatch.remove(pipe), forgetpatch.apply(pipe, read[1]))))
            forgetpatch.remove(pipe)
        apply_s = _median(applies)
        print(f"pipeline load to {args.device} ({args.dtype}) {_spread(loads, 's', 1.0)}, median of {args.loads}; "
              f"{len(paths)} modules per patch "
              f"({args.style}, rank {args.rank}); apply / remove / switch: median of {args.apply_repeats}")  # fmt: skip
        print(f"apply unfused  {_spread(applies)}   remove {_spread(removes)}")
        print(f"apply fused    {_spread(fused_applies)}   remove {_spread(fused_removes)}")
        for what, times_s in (("from its folder", switches), ("already read", read_switches)):
            print(f"switch (remove one, apply another {what}) {_spread(times_s)}   "
                  f"{'meets' if _median(times_s) <= 0.050 else 'misses'} the target (<= 50 ms)")  # fmt: skip
        print(f"apply / load   {apply_s / load_s:.2%} unfused, {_median(fused_applies) / load_s:.2%} fused   "
              f"{'meets' if apply_s / load_s <= 0.05 else 'misses'} the target (<= 5%)", flush=True)  # fmt: skip
        if args.style == "xattn":  # every target a Linear
            floor = peft_layers_ms(pipe, paths, args.rank)
            print(f"of an unfused apply, peft building its {len(paths)} LoRA layers alone: {floor:.1f} ms, "
                  f"{floor / 1000 / load_s:.2%} of load", flush=True)  # fmt: skip
        if args.no_inference:
            return

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
            g = torch.Generator(args.device).manual_seed(0)
            gc.collect()
            wait(args.device)
            wall, cpu = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                pipe("a photo of a cat", num_inference_steps=args.steps, height=args.size, width=args.size,
                     output_type="latent", generator=g)  # fmt: skip
            wait(args.device)
            return time.perf_counter() - wall, time.process_time() - cpu

        configs = ["base", "base again", "fused", "unfused x1", "unfused x3", "gated x1"]
        times: dict[str, list[tuple[float, float]]] = {c: [] for c in configs}
        order = random.Random(args.seed)
        for c in configs:  # warm-up
            setup(c)
            run()
        for _ in range(args.repeats):
            for c in order.sample(configs, len(configs)):
                setup(c)
                times[c].append(run())
        forgetpatch.remove(pipe)

    print(f"\ninference on {args.device} ({args.dtype}): {args.size}px, {args.steps} steps, CFG, "
          f"threads={torch.get_num_threads()}, "
          f"{args.repeats} rounds in random order; ratio = time / base time of the same round, "
          "median (min-max) over rounds")  # fmt: skip
    base_cpu = _median([t[1] for t in times["base"]])
    base_wall = _median([t[0] for t in times["base"]])
    print(f"base                  cpu {base_cpu:.2f} s   wall {base_wall:.2f} s")
    targets = {"base again": None, "fused": 1.01, "unfused x1": None, "unfused x3": 1.10, "gated x1": 1.05}
    for c, target in targets.items():
        cpu = [t[1] / b[1] for t, b in zip(times[c], times["base"], strict=True)]
        wall = [t[0] / b[0] for t, b in zip(times[c], times["base"], strict=True)]
        note = "(control: same model)" if c == "base again" else f"(target <= {target:.2f}x)" if target else ""
        print(f"{c:<12} / base   cpu {_median(cpu):.3f}x ({min(cpu):.3f}-{max(cpu):.3f})   "
              f"wall {_median(wall):.3f}x ({min(wall):.3f}-{max(wall):.3f})  {note}")  # fmt: skip


if __name__ == "__main__":
    main()
