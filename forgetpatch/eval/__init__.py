"""Forgetting and retention metrics on the toy world (UnlearnCanvas-style UA / IRA / CRA).

Evaluation never loads patches itself: apply them to the pipeline first (``forgetpatch.apply``),
then evaluate it against the base.

Example:
    >>> from forgetpatch.eval import evaluate
    >>> base = evaluate(forgetpatch.toy.pipeline(), ["circle"])          # base figures, reusable
    >>> report = evaluate(patched_pipe, ["circle"], reference=base)
    >>> rich.print(report.table())

Real weights: :func:`evaluate_suite` runs the nudity, objects, styles and quality suites with pinned
detectors (NudeNet, CLIP from a local folder, FID's Inception from a local file; :mod:`forgetpatch.eval.suites`)
and returns the same kind of report.

UA is strict (:mod:`forgetpatch.eval.report`): an image counts as forgotten only when the judge
confidently names another concept or sees no shape; every rate carries its sample size and 95% interval.

Key-step analysis (:mod:`forgetpatch.eval.keysteps`: ``analyze``, ``KeyStepCurve``, ``compare_with_preset``,
``toy_detector``, ``toy_prompts``) is imported on first use: it needs diffusers and the methods.
"""

from forgetpatch.eval.blindfold import blindfold
from forgetpatch.eval.ceiling import guide_ceiling, steered_to
from forgetpatch.eval.generate import (
    DEFAULT_GUIDANCE_SCALE,
    Generator,
    PipelineGenerator,
    as_generator,
    check_guidance,
)
from forgetpatch.eval.geometry import fit_shapes
from forgetpatch.eval.grid import save_grid, save_report_grid, save_rows
from forgetpatch.eval.metrics import (
    MAX_SEED,
    Judge,
    Replay,
    check_counts,
    check_seed,
    evaluate,
    rejudge,
    scoring_prompts,
    toy_judge,
)
from forgetpatch.eval.prompts import ScoringPrompt, main_prompts, paraphrase_prompts
from forgetpatch.eval.report import (
    ConceptReport,
    EvalReport,
    Scores,
    Verdict,
    forgotten,
    measured_alone,
    outcome,
    patches_on,
    record_toy,
    score_concept,
    wilson,
)
from forgetpatch.eval.suites import (
    SUITE_GUIDANCE_SCALE,
    SUITE_METRICS,
    SUITES,
    ClipJudge,
    FeatureNet,
    NudeNetDetector,
    SuitePrompt,
    SuiteReport,
    check_clip_folder,
    check_inception,
    evaluate_suite,
    frechet_distance,
    load_inception,
    read_images,
    read_prompt_csv,
)
from forgetpatch.eval.suites import record as record_suite
from forgetpatch.lazy import lazy_exports

#: Names imported on first use (their module is heavy to import) -> (submodule, its name for it).
_LAZY = {
    "KeyStepCurve": ("keysteps", "KeyStepCurve"),
    "analyze": ("keysteps", "analyze"),
    "compare_with_preset": ("keysteps", "compare_with_preset"),
    "toy_detector": ("keysteps", "toy_detector"),
    "toy_prompts": ("keysteps", "toy_prompts"),
}
__getattr__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "MAX_SEED",
    "DEFAULT_GUIDANCE_SCALE",
    "SUITES",
    "SUITE_GUIDANCE_SCALE",
    "SUITE_METRICS",
    "ClipJudge",
    "ConceptReport",
    "EvalReport",
    "FeatureNet",
    "KeyStepCurve",
    "Generator",
    "Judge",
    "NudeNetDetector",
    "PipelineGenerator",
    "Replay",
    "Scores",
    "ScoringPrompt",
    "SuitePrompt",
    "SuiteReport",
    "Verdict",
    "analyze",
    "as_generator",
    "check_counts",
    "check_guidance",
    "check_seed",
    "blindfold",
    "check_clip_folder",
    "check_inception",
    "compare_with_preset",
    "evaluate",
    "evaluate_suite",
    "fit_shapes",
    "forgotten",
    "frechet_distance",
    "guide_ceiling",
    "load_inception",
    "main_prompts",
    "measured_alone",
    "outcome",
    "paraphrase_prompts",
    "patches_on",
    "read_images",
    "read_prompt_csv",
    "record_suite",
    "record_toy",
    "rejudge",
    "save_grid",
    "save_report_grid",
    "save_rows",
    "score_concept",
    "scoring_prompts",
    "steered_to",
    "toy_detector",
    "toy_judge",
    "toy_prompts",
    "wilson",
]
