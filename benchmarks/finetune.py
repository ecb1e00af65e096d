"""KSCU vs ESD on the toy world, and a few KSCU iterations on the full-size SD 1.5 architecture.

Toy world (same concept, seeds, iterations, learning rate and trajectory sampler for both methods):
forgetting (UA, paraphrase UA), retention (IRA, CRA, near neighbours as ratios of the base, image
drift) and compute (UNet passes: sampling + teacher + student forwards and backwards; wall time).
KSCU is measured twice: patch always on, and gated to its key steps at inference
(``apply(..., key_steps=True)``). The issue's bars are printed as PASS/FAIL from the numbers of the
run, never assumed.

Run:
    python benchmarks/finetune.py toy --concept circle --iterations 400 --lr 5e-4 --scope xattn --images 16
    python benchmarks/finetune.py arch --family sd15 --iterations 3 --latent-size 16
    python benchmarks/finetune.py arch --method dynamic_mask --iterations 20 --latent-size 64 --images 2

Bars (issue 6): KSCU erasing one shape: UA >= 90%, IRA >= 85% of base, CRA >= 90% of base, in
<= 15 min on 2 CPU cores; KSCU reaching ESD's UA with at most half of ESD's UNet passes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import forgetpatch.methods as methods


def _scores(report: Any, concept: str) -> dict[str, Any]:
    from forgetpatch.eval import rejudge
    from forgetpatch.toy import load_judge

    c = report.concepts[concept]
    return {
        "ua": c.scores.ua,
        "ua_95": c.scores.interval["ua"],
        "ua_top1": c.scores.ua_top1,
        "ua_v1": rejudge(report, load_judge("v1")).concepts[concept].scores.ua,
        "paraphrase_ua": None if c.scores.leakage is None else 1 - c.scores.leakage,
        "ira_ratio": c.ratios["ira"],
        "ira_ratio_95": c.ratio_interval.get("ira"),
        "cra_ratio": c.ratios["cra"],
        "cra_ratio_95": c.ratio_interval.get("cra"),
        "near_ratio": c.ratios["near"],
        "near_ratio_95": c.ratio_interval.get("near"),
        "drift": report.drift,
    }


def toy(args: argparse.Namespace) -> dict[str, Any]:
    from forgetpatch.eval import evaluate
    from forgetpatch.loader import apply, remove
    from forgetpatch.toy import pipeline

    pipe = pipeline()
    settings = dict(
        iterations=args.iterations,
        lr=args.lr,
        seed=args.seed,
        num_inference_steps=args.steps,
        rank=args.rank,
        progress=not args.quiet,
    )
    eval_kw = dict(
        images_per_concept=args.images,
        images_per_erased=args.ua_images,
        seed=args.seed,
        progress=not args.quiet,
    )
    base = evaluate(pipe, [args.concept], **eval_kw)
    base_ua = base.concepts[args.concept].scores.ua
    rows: dict[str, dict[str, Any]] = {}
    extra = {"key_step_analysis": args.analysis} if args.analysis else {}
    scoped = {
        "kscu": {"scope": args.scope} if args.scope else {},
        "esd": {"variant": {"xattn": "x", "noxattn": "u"}[args.scope]} if args.scope else {},
    }
    concept = methods.Concept(args.concept, guide=args.guide)
    for method in args.methods:
        start = time.perf_counter()
        patch = methods.erase(
            pipe,
            [concept],
            method=method,
            **settings,
            **scoped[method],
            **(extra if methods.get_method(method).key_steps else {}),
        )
        erase_s = time.perf_counter() - start
        if args.out:
            patch.save(Path(args.out) / f"{method}-{args.concept}")
        passes = patch.manifest.metrics["training"]["unet_passes"]
        gates = [False, True] if methods.get_method(method).key_steps else [False]
        for gated in gates:
            apply(pipe, patch, key_steps=gated)
            try:
                report = evaluate(pipe, [args.concept], reference=base, **eval_kw)
            finally:
                remove(pipe)
            name = f"{method}{' (key-step gated)' if gated else ''}"
            rows[name] = {**_scores(report, args.concept), "unet_passes": passes["total"], "erase_s": erase_s}
    settings = {**settings, "scope": args.scope or "preset", "guide": args.guide, "images": args.images}
    return {"concept": args.concept, "settings": settings, "base_ua": base_ua, "rows": rows}


def print_toy(result: dict[str, Any]) -> None:
    from forgetpatch.rates import interval_text, percent

    def f(v: Any, pct: bool = True) -> str:
        if v is None:
            return "n/a"
        if isinstance(v, list):
            return interval_text(v)
        return percent(v) if pct else f"{v:.3g}"

    print(f"\nconcept {result['concept']}  settings {result['settings']}  base UA {f(result['base_ua'])}")
    cols = ["ua", "ua_95", "ua_top1", "ua_v1", "paraphrase_ua", "ira_ratio", "ira_ratio_95", "cra_ratio", "cra_ratio_95",
            "near_ratio", "near_ratio_95", "drift", "unet_passes", "erase_s"]
    print("| method | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in result["rows"].items():
        cells = [f(row[c], pct=c not in ("drift", "unet_passes", "erase_s")) for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")
    k, e = result["rows"].get("kscu"), result["rows"].get("esd")
    if k:
        bars = {
            "strict UA >= 90% (95% lower bound)": k["ua_95"][0] >= 0.9,
            "IRA >= 85% of base (95% lower bound)": (k["ira_ratio_95"] or [0])[0] >= 0.85,
            "CRA >= 90% of base (95% lower bound)": (k["cra_ratio_95"] or [0])[0] >= 0.9,
            "erase <= 15 min": k["erase_s"] <= 900,
        }
        for bar, ok in bars.items():
            print(f"KSCU {bar}: {'PASS' if ok else 'FAIL'}")
    if k and e:
        ratio = k["unet_passes"] / e["unet_passes"]
        print(f"KSCU/ESD UNet passes: {ratio:.2f}; KSCU UA {f(k['ua'])} {f(k['ua_95'])} vs ESD UA {f(e['ua'])} "
              f"{f(e['ua_95'])}")
        # KSCU reaches ESD's UA unless its interval lies wholly under ESD's
        ok = k["ua_95"][1] >= e["ua_95"][0] and ratio <= 0.5
        print(f"claim 'ESD's UA with <= half the passes' (intervals overlapping): {'HOLDS' if ok else 'DOES NOT HOLD'} "
              "in this run")


def arch(args: argparse.Namespace) -> dict[str, Any]:
    """A few iterations of KSCU (or Dynamic Mask, ``--method``) on a random-weight full-size architecture:
    shapes, scopes, time per iteration. Dynamic Mask's ``--iterations`` are its training steps, after it has
    generated ``--images`` training images with ``--steps`` sampling steps."""
    import torch

    from forgetpatch.testing import published_pipeline

    pipe = published_pipeline(args.family)
    if torch.cuda.is_available():
        pipe.to("cuda")
    if args.method == "kscu":
        concept, params = "circle", {"iterations": args.iterations, "rank": args.rank}
    else:
        warmup = max(1, args.iterations // 10)
        concept = methods.Concept("circle", superclass="shape")
        params = {"steps": args.iterations, "epochs": min(2, args.iterations), "warmup": warmup,
                  "update_every": warmup, "batch": 1, "images": args.images}  # fmt: skip
    params |= {"scope": args.scope} if args.scope else {}  # Dynamic Mask refuses it: its layers are fixed
    start = time.perf_counter()
    patch = methods.erase(
        pipe,
        [concept],
        method=args.method,
        num_inference_steps=args.steps,
        latent_size=args.latent_size,
        lr=args.lr,
        progress=not args.quiet,
        **params,
    )
    total = time.perf_counter() - start
    m = patch.manifest
    run = m.metrics["training"] if args.method == "kscu" else m.metrics["dynamic_mask"]
    return {
        "method": args.method,
        "family": args.family,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "latent_size": args.latent_size,
        "iterations": args.iterations,
        "target_modules": len(m.lora.target_modules),
        "lora_rank": m.lora.rank,
        "unet_passes": run["unet_passes"],
        "train_s": run["wall_time_s"],
        "total_s": round(total, 2),
        "key_steps": m.key_steps[0].model_dump() if m.key_steps else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("toy", help="KSCU vs ESD on the toy world")
    t.add_argument("--concept", default="circle")
    t.add_argument("--methods", nargs="+", default=["kscu", "esd"])
    t.add_argument("--iterations", type=int, default=200)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--steps", type=int, default=50)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--images", type=int, default=8)
    t.add_argument("--ua-images", type=int, default=None, help="UA images of the concept (default: --images)")
    t.add_argument("--analysis", default=None, help="folder or JSON from `forgetpatch keysteps`")
    t.add_argument("--guide", default=None, help="anchor prompt instead of the empty prompt, e.g. shape")
    t.add_argument("--scope", choices=["xattn", "noxattn"], default=None, help="override the presets")
    a = sub.add_parser("arch", help="a few KSCU iterations on a published architecture")
    a.add_argument("--family", default="sd15", choices=["sd15", "sd21", "sdxl"])
    a.add_argument("--iterations", type=int, default=3)
    a.add_argument("--steps", type=int, default=50)
    a.add_argument("--latent-size", type=int, default=16)
    a.add_argument("--rank", type=int, default=4)
    a.add_argument("--lr", type=float, default=1e-5)
    a.add_argument("--scope", choices=["xattn", "noxattn"], default=None, help="override the object preset")
    a.add_argument("--method", choices=["kscu", "dynamic_mask"], default="kscu")
    a.add_argument("--images", type=int, default=2, help="Dynamic Mask's training images")
    for p in (t, a):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=None)
        p.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.what == "toy":
        result = toy(args)
        print_toy(result)
    else:
        result = arch(args)
        print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"finetune-{args.what}.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
