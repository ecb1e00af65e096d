"""Forgetting and retention metrics on the toy world (UnlearnCanvas-style UA / IRA / CRA).

Evaluation never loads patches itself: apply them to the pipeline first (``forgetpatch.apply``),
then evaluate it against the base.

Example:
    >>> from forgetpatch.eval import evaluate
    >>> base = evaluate(forgetpatch.toy.pipeline(), ["circle"])          # base figures, reusable
    >>> report = evaluate(patched_pipe, ["circle"], reference=base)
    >>> rich.print(report.table())
"""

from forgetpatch.eval.blindfold import blindfold
from forgetpatch.eval.ceiling import guide_ceiling
from forgetpatch.eval.generate import DEFAULT_GUIDANCE_SCALE, Generator, PipelineGenerator, as_generator
from forgetpatch.eval.grid import save_grid, save_report_grid
from forgetpatch.eval.metrics import Judge, evaluate, scoring_prompts
from forgetpatch.eval.prompts import ScoringPrompt, main_prompts, paraphrase_prompts
from forgetpatch.eval.report import ConceptReport, EvalReport, Scores, score_concept

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "ConceptReport",
    "EvalReport",
    "Generator",
    "Judge",
    "PipelineGenerator",
    "ScoringPrompt",
    "Scores",
    "as_generator",
    "blindfold",
    "evaluate",
    "guide_ceiling",
    "main_prompts",
    "paraphrase_prompts",
    "save_grid",
    "save_report_grid",
    "score_concept",
    "scoring_prompts",
]
