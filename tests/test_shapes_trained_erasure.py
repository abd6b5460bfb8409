"""Measured on the shipped world: ESD, Concept Ablation and full MACE erase "skull" from builtin:shapes.

The claim behind the `shapes-restricted` rows of these methods (bench/results/shapes_restricted.json, 8 seeds),
asserted with the benchmark's own settings on its first 4 seeds, named and preserved prompts only: the skull is
drawn far less than by the unedited model, and the five preserved shapes still are."""

from __future__ import annotations

import pytest

from conceptsmith.evaluation.engine import load_bench, run_bench

METHODS = ("esd", "concept-ablation", "mace")


@pytest.fixture(scope="module")
def skull_erased(tmp_path_factory):
    restricted, _ = load_bench("shapes-restricted")
    task = restricted.tasks[0].model_copy(update={"indirect": {}})
    config = restricted.model_copy(update={
        "name": "shapes-restricted-trained",
        "seeds": [0, 1, 2, 3],
        "tasks": [task],
        "methods": [method for method in restricted.methods if method.label() in METHODS],
        "attacks": [],
    })
    return run_bench(config, tmp_path_factory.mktemp("skull"), progress=False, report=False).results["summary"]


@pytest.mark.parametrize("method", METHODS)
def test_trained_erasers_erase_skull_from_builtin_shapes(skull_erased, method):
    unedited, erased = skull_erased["unedited"], skull_erased[method]
    assert unedited["acc_e"] >= 0.75, unedited  # the base model draws skulls (so the test can fail)
    assert erased["acc_e"] <= 0.25, erased  # measured: 0.00 for each on these seeds (8 seeds: esd 0.25, ca 0.12, mace 0.00)
    assert erased["acc_s_rel"] >= 0.85, erased  # circle, square, triangle, star and heart are still drawn
    assert erased["train_seconds"] > 0
