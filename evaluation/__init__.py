"""ConceptSmith evaluation: CLIP evaluators, metrics and attacks.

Importing a submodule registers its plugins (``evaluation.metrics`` registers the metrics). The
names below are re-exported lazily so that ``import evaluation`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # evaluation.clip
    "Evaluator": "evaluation.clip",
    "Classification": "evaluation.clip",
    "ClipScore": "evaluation.clip",
    "load_evaluator": "evaluation.clip",
    "register_evaluator": "evaluation.clip",
    # evaluation.metrics
    "Accuracy": "evaluation.metrics",
    "accuracy_from_probs": "evaluation.metrics",
    "evaluator_accuracy": "evaluation.metrics",
    "harmonic_overall": "evaluation.metrics",
    "harmonic_concept": "evaluation.metrics",
    "erasure_summary": "evaluation.metrics",
    "frechet_distance": "evaluation.metrics",
    "fd_clip": "evaluation.metrics",
    "paired_specificity": "evaluation.metrics",
    "clip_t": "evaluation.metrics",
    "clip_i": "evaluation.metrics",
    "both_concepts_present_rate": "evaluation.metrics",
    # evaluation.attacks
    "embedding_attack": "evaluation.attacks",
    "closed_form_attack_embeddings": "evaluation.attacks",
    "concept_vector": "evaluation.attacks",
    "ring_a_bell": "evaluation.attacks",
    "reverted": "evaluation.attacks",
    "attack_success_rate": "evaluation.attacks",
    # evaluation.training_attacks / evaluation.prompt_attacks
    "textual_inversion_attack": "evaluation.training_attacks",
    "unlearn_diff_attack": "evaluation.prompt_attacks",
    "p4d_attack": "evaluation.prompt_attacks",
    # evaluation.attack_plugins (the registered attacks' interface)
    "AttackContext": "evaluation.attack_plugins",
    "AttackCondition": "evaluation.attack_plugins",
    "AttackPlan": "evaluation.attack_plugins",
    "score_attack": "evaluation.attack_plugins",
    # evaluation.bench / evaluation.report
    "BenchConfig": "evaluation.bench",
    "load_bench_config": "evaluation.bench",
    "run_bench": "evaluation.bench",
    "summary_table": "evaluation.bench",
    "write_report": "evaluation.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
