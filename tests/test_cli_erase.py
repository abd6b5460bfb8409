"""`conceptsmith erase`: writes a loadable Edit; bad inputs name the problem and the fix."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conceptsmith.cli import app
from conceptsmith.edits import Edit

runner = CliRunner()


def test_erase_writes_an_edit_bound_to_the_base(tmp_path):
    out = tmp_path / "e.safetensors"
    result = runner.invoke(app, ["erase", "-m", "builtin:tiny-test", "--method", "uce", "-c", "red circle",
                                 "--preserve", "blue star", "-o", str(out)])
    assert result.exit_code == 0, result.output
    edit = Edit.load(out)
    assert edit.method == "uce" and edit.concepts == ["red circle"]
    assert edit.kind == "weights"
    solver = edit.metadata["closed_form"]
    assert f"closed_form.condition_number: {solver['condition_number']:.4g}" in result.output
    assert f"closed_form.rank: {solver['rank']}" in result.output and "max_preserve_residual" in result.output
    inspect = runner.invoke(app, ["inspect", "builtin:tiny-test", "--json"])
    assert edit.base_fingerprint in inspect.stdout


def test_erase_with_config_file(tmp_path):
    config = tmp_path / "uce.yaml"
    config.write_text("method: uce\nparams:\n  lam: 0.1\n  token_policy: phrase\n")
    out = tmp_path / "e.safetensors"
    result = runner.invoke(app, ["erase", "-m", "builtin:tiny-test", "--config", str(config), "-c", "red circle",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert Edit.load(out).params["token_policy"] == "phrase"


@pytest.mark.parametrize(
    ("extra", "config_text", "message"),
    [
        (["--method", "no-such"], None, "Unknown editor 'no-such'"),
        (["--method", "uce", "-c", ""], None, "empty"),
        ([], None, "Name a method"),
        (["--method", "rece"], "method: uce\n", "disagrees"),
        ([], "method: uce\nparams:\n  lamda: 1\n", "lamda"),
        ([], "method: uce\nparams:\n  token_policy: first_word\n", "last_word"),
    ],
)
def test_erase_bad_inputs(tmp_path, extra, config_text, message):
    args = ["erase", "-m", "builtin:tiny-test", "-o", str(tmp_path / "e.safetensors")]
    if "-c" not in extra:
        args += ["-c", "red circle"]
    if config_text is not None:
        (tmp_path / "c.yaml").write_text(config_text)
        args += ["--config", str(tmp_path / "c.yaml")]
    result = runner.invoke(app, args + extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "e.safetensors").exists()


def test_erase_without_concepts():
    result = runner.invoke(app, ["erase", "-m", "builtin:tiny-test", "--method", "uce"])
    assert result.exit_code == 2 and "No concept given" in result.output


def test_erase_then_lora_and_single_file_export(tmp_path):
    """The CLI chain erase -> to-lora / export produces files that load back."""
    import torch
    from safetensors import safe_open

    edit_file = tmp_path / "e.safetensors"
    assert runner.invoke(app, ["erase", "-m", "builtin:tiny-test", "--method", "uce", "-c", "red circle",
                               "-o", str(edit_file)]).exit_code == 0
    lora = runner.invoke(app, ["to-lora", str(edit_file), "-o", str(tmp_path / "lora.safetensors")])
    assert lora.exit_code == 0, lora.output
    assert "max relative truncation error 0.00e+00" in lora.output
    with safe_open(str(tmp_path / "lora.safetensors"), framework="pt") as handle:
        assert any(key.endswith("lora_A.weight") for key in handle.keys())
    exported = runner.invoke(app, ["export", "-m", "builtin:tiny-test", "-e", str(edit_file), "--half",
                                   "-o", str(tmp_path / "model.safetensors")])
    assert exported.exit_code == 0, exported.output
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    refused = runner.invoke(app, ["export", "-m", "builtin:tiny-test", "-o", str(tmp_path / "model.ckpt")])
    assert refused.exit_code == 2 and ".safetensors" in refused.output


def test_erase_with_a_trained_method_and_its_errors(tmp_path):
    """A trained eraser from the command line; te-unlearn without images (or with a wrong path) says what to pass."""
    from PIL import Image

    config = tmp_path / "esd.yaml"
    config.write_text("method: esd\nparams:\n  steps: 3\n  trajectories: 1\n  ddim_steps: 3\n  progress: false\n")
    out = tmp_path / "esd.safetensors"
    result = runner.invoke(app, ["erase", "-m", "builtin:tiny-test", "--config", str(config), "-c", "red circle", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert Edit.load(out).kind == "lora" and "train_seconds" in result.output
    missing = runner.invoke(app, ["erase", "-m", "builtin:tiny-test", "--method", "te-unlearn", "-c", "red circle",
                                  "-o", str(tmp_path / "te.safetensors")])
    assert missing.exit_code == 2 and "images" in missing.output and "Traceback" not in missing.output
    wrong = runner.invoke(app, ["erase", "-m", "builtin:tiny-test", "--method", "te-unlearn", "-c", "red circle",
                                "--images", str(tmp_path / "nowhere"), "-o", str(tmp_path / "te.safetensors")])
    assert wrong.exit_code == 2 and "does not exist" in wrong.output
    folder = tmp_path / "circles"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (200, 30 * i, 30)).save(folder / f"{i}.png")
    te_config = tmp_path / "te.yaml"
    te_config.write_text("method: te-unlearn\nparams:\n  steps: 2\n  progress: false\n")
    made = runner.invoke(app, ["erase", "-m", "builtin:tiny-test", "--config", str(te_config), "-c", "red circle",
                               "--images", str(folder), "-o", str(tmp_path / "te.safetensors")])
    assert made.exit_code == 0, made.output
    assert all(m.startswith("text_encoder.") for m in Edit.load(tmp_path / "te.safetensors").module_shapes)
