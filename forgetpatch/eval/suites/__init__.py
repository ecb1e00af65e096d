"""Evaluation on real weights: the nudity, objects, styles and quality suites (issue 15).

Any diffusers text-to-image pipeline, patches applied by the caller; pinned detectors whose record (version, model
file sha256, threshold, classes) goes into the report and, with :func:`record`, into the patch's manifest:

* NudeNet (the ``nudenet`` package ships its detector, so it runs offline),
* CLIP from a local folder (zero-shot accuracy, CLIP score),
* FID with torch-fidelity's Inception-v3 from a local weights file.

Prompts are the suites' own small lists (:mod:`~forgetpatch.eval.suites.prompts`) or a CSV in the I2P layout.
The report is the toy world's :class:`~forgetpatch.eval.EvalReport` (a :class:`SuiteReport`).

Example:
    >>> from forgetpatch.eval import evaluate_suite, read_prompt_csv
    >>> base = evaluate_suite(pipe, "nudity", prompts=read_prompt_csv("i2p.csv", concept="nudity", limit=200))
    >>> report = evaluate_suite(forgetpatch.apply(pipe, "no-nudity/"), "nudity", reference=base,
    ...                         prompts=read_prompt_csv("i2p.csv", concept="nudity", limit=200))
    >>> rich.print(report.table())
"""

from forgetpatch.eval.suites.detectors import (
    EXTRA_HINT,
    INCEPTION_FILE,
    NUDENET_CLASSES,
    NUDENET_THRESHOLD,
    NUDITY_CLASSES,
    ClipJudge,
    FeatureNet,
    NudeNetDetector,
    check_clip_folder,
    check_inception,
    frechet_distance,
    load_inception,
    nudity_verdict,
)
from forgetpatch.eval.suites.prompts import (
    ARTISTS,
    NUDITY_PROMPTS,
    OBJECT_CLASSES,
    QUALITY_PROMPTS,
    SUITES,
    SuitePrompt,
    nudity_prompts,
    object_prompts,
    quality_prompts,
    read_prompt_csv,
    style_prompts,
)
from forgetpatch.eval.suites.run import (
    SUITE_GUIDANCE_SCALE,
    SUITE_METRICS,
    SuiteReport,
    evaluate_suite,
    mean_interval,
    rate,
    read_images,
    record,
)

__all__ = [
    "ARTISTS",
    "EXTRA_HINT",
    "INCEPTION_FILE",
    "NUDENET_CLASSES",
    "NUDENET_THRESHOLD",
    "NUDITY_CLASSES",
    "NUDITY_PROMPTS",
    "OBJECT_CLASSES",
    "QUALITY_PROMPTS",
    "SUITES",
    "SUITE_GUIDANCE_SCALE",
    "SUITE_METRICS",
    "ClipJudge",
    "FeatureNet",
    "NudeNetDetector",
    "SuitePrompt",
    "SuiteReport",
    "check_clip_folder",
    "check_inception",
    "evaluate_suite",
    "frechet_distance",
    "load_inception",
    "mean_interval",
    "nudity_prompts",
    "nudity_verdict",
    "object_prompts",
    "quality_prompts",
    "rate",
    "read_images",
    "read_prompt_csv",
    "record",
    "style_prompts",
]
