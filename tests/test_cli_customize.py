"""`conceptsmith customize` and `conceptsmith merge` from the command line, with their error paths."""

from __future__ import annotations

from test_customization import make_references
from typer.testing import CliRunner

from conceptsmith.cli import app
from conceptsmith.edits import Edit

runner = CliRunner()


def test_customize_then_merge(tmp_path):
    config = tmp_path / "ti.yaml"
    config.write_text("method: textual-inversion\nparams:\n  steps: 2\n  phrase: '{token} {class_word}'\n")
    outs = []
    for name, color in (("<tok-a>", (230, 40, 20)), ("<tok-b>", (20, 40, 230))):
        refs = make_references(tmp_path / name.strip("<>"), color=color)
        out = tmp_path / f"{name.strip('<>')}.safetensors"
        result = runner.invoke(app, ["customize", "-m", "builtin:tiny-test", "--config", str(config), "-t", name,
                                     "--class-word", "square", "--images", str(refs), "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert f'prompt with: "{name} square"' in result.output  # the phrase to use, class word included
        outs.append(out)
    assert Edit.load(outs[0]).method == "textual-inversion"


def test_customize_bad_inputs(tmp_path):
    base = ["customize", "-m", "builtin:tiny-test", "--method", "textual-inversion"]
    no_token = runner.invoke(app, base + ["--images", str(tmp_path)])
    assert no_token.exit_code == 2 and "No token given" in no_token.output
    mismatch = runner.invoke(app, base + ["-t", "<a>", "-t", "<b>", "--images", str(tmp_path)])
    assert mismatch.exit_code == 2 and "one --images folder per --token" in mismatch.output
    empty = runner.invoke(app, base + ["-t", "<a>", "--class-word", "toy", "--images", str(tmp_path)])
    assert empty.exit_code == 2 and "No images" in empty.output


def test_merge_needs_two_edits_and_a_model_for_closed_form(tmp_path):
    one = runner.invoke(app, ["merge", str(tmp_path / "a.safetensors")])
    assert one.exit_code == 2 and "at least two" in one.output
    missing = runner.invoke(app, ["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])
    assert missing.exit_code == 2 and "a.safetensors" in missing.output
