"""End to end on the shipped world: UCE erases a shape from builtin:shapes, judged by builtin:shapes-clip.

The measured claim behind the benchmarks, asserted with fixed seeds: the erased shape is no longer drawn, from its
name or its paraphrase, and the other shapes still are. This is the triangle task of `shapes-objects` on 4 seeds
(bench/results/shapes_objects.json, 8 seeds: acc_e 0.00, acc_g 0.00, acc_s_rel 0.98)."""

from __future__ import annotations

import pytest

from conceptsmith.evaluation.engine import load_bench, run_bench


@pytest.fixture(scope="module")
def triangle_erased(tmp_path_factory):
    objects, _ = load_bench("shapes-objects")
    config = objects.model_copy(update={
        "name": "shapes-objects-triangle",
        "seeds": [0, 1, 2, 3],
        "eval_templates": ["a picture of a {}", "an image of a {}"],
        "tasks": [task for task in objects.tasks if task.name == "erase-triangle"],
        "methods": [method for method in objects.methods if method.name == "uce"],
        "attacks": [],
    })
    return run_bench(config, tmp_path_factory.mktemp("triangle"), progress=False, report=False)


def test_uce_erases_triangle_from_builtin_shapes_and_keeps_the_rest(triangle_erased):
    summary = triangle_erased.results["summary"]
    unedited, uce = summary["unedited"], summary["uce"]
    assert unedited["acc_e"] >= 0.75, unedited  # the base model draws triangles (so the test can fail)
    assert uce["acc_e"] <= 0.25, uce  # ... and the edited one does not
    assert uce["acc_g"] <= 0.25, uce  # nor from the paraphrase "three-sided wedge"
    assert uce["acc_s_rel"] >= 0.85, uce  # the eight other shapes are still drawn
