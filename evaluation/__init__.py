"""ConceptSmith evaluation: CLIP evaluators, metrics and attacks.

Importing a submodule registers its plugins (``evaluation.metrics`` registers the metrics). The
names below are re-exported lazily so that ``import evaluation`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # evaluation.clip
    "Evaluator": "conceptsmith.evaluation.clip",
    "Classification": "conceptsmith.evaluation.clip",
    "ClipScore": "conceptsmith.evaluation.clip",
    "load_evaluator": "conceptsmith.evaluation.evaluators",
    "register_evaluator": "conceptsmith.evaluation.evaluators",
    # evaluation.metrics
    "Accuracy": "conceptsmith.evaluation.metrics",
    "accuracy_from_probs": "conceptsmith.evaluation.metrics",
    "evaluator_accuracy": "conceptsmith.evaluation.metrics",
    "harmonic_overall": "conceptsmith.evaluation.metrics",
    "harmonic_concept": "conceptsmith.evaluation.metrics",
    "erasure_summary": "conceptsmith.evaluation.metrics",
    "frechet_distance": "conceptsmith.evaluation.metrics",
    "fd_clip": "conceptsmith.evaluation.metrics",
    "paired_specificity": "conceptsmith.evaluation.metrics",
    "clip_t": "conceptsmith.evaluation.metrics",
    "clip_i": "conceptsmith.evaluation.metrics",
    "both_concepts_present_rate": "conceptsmith.evaluation.metrics",
    # evaluation.attacks
    "embedding_attack": "conceptsmith.evaluation.attacks",
    "closed_form_attack_embeddings": "conceptsmith.evaluation.attacks",
    "concept_vector": "conceptsmith.evaluation.attacks",
    "ring_a_bell": "conceptsmith.evaluation.attacks",
    "reverted": "conceptsmith.evaluation.attacks",
    "attack_success_rate": "conceptsmith.evaluation.attacks",
    # evaluation.training_attacks / evaluation.prompt_attacks
    "textual_inversion_attack": "conceptsmith.evaluation.training_attacks",
    "unlearn_diff_attack": "conceptsmith.evaluation.prompt_attacks",
    "p4d_attack": "conceptsmith.evaluation.prompt_attacks",
    # evaluation.attack_plugins (the registered attacks' interface)
    "AttackContext": "conceptsmith.evaluation.attack_plugins",
    "AttackCondition": "conceptsmith.evaluation.attack_plugins",
    "AttackPlan": "conceptsmith.evaluation.attack_plugins",
    "score_attack": "conceptsmith.evaluation.attack_plugins",
    # the benchmark engine and its reports
    "ErasureBench": "conceptsmith.evaluation.erasure_spec",
    "CustomBench": "conceptsmith.evaluation.custom_spec",
    "load_bench": "conceptsmith.evaluation.engine",
    "run_bench": "conceptsmith.evaluation.engine",
    "summary_table": "conceptsmith.evaluation.report",
    "write_report": "conceptsmith.evaluation.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
