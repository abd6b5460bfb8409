"""Reliability report: concrete bad inputs, category by category, through the real ``conceptsmith`` command.

Every case runs as a user runs it (``python -m conceptsmith ARGS``, a fresh process, one torch thread) in its
own fresh copy of a scratch folder holding the files the cases name (edit files made here for ``builtin:shapes``,
FIFOs, a hard link, folders, crafted images, YAML and edit-file variants), so that a case that destroys a file
cannot spoil the next. A case is

* **clean**: exit code 2, exactly one ``error: ...`` line that names the problem (the case's expected phrase),
  no traceback, and no file of the scratch folder written or changed;
* **traceback**: a Python traceback in the output, or an exit code other than 0 and 2;
* **wrong**: anything else: accepted (exit 0), refused without naming the problem, files written, or a hang
  (no answer within ``--timeout`` seconds; e.g. a FIFO opened for reading).

Run: ``.venv/bin/python bench/fuzz_report.py`` (``--only seeds,yaml`` for some categories). Writes
``bench/results/reliability.json`` (every case: arguments, exit code, first error line, seconds) and
``bench/results/reliability.md`` (the table). ``--baseline OLD.json --baseline-label TEXT`` adds the table of an
earlier run (e.g. this script run on an older checkout) as "before" columns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "builtin:shapes"


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    args: tuple[str, ...]  # "{W}" stands for the scratch folder ("$W" in the report)
    expect: str  # a phrase the error line must hold


def _cases() -> list[Case]:
    gen = ("generate", "-m", MODEL, "-p", "a red circle", "-o", "{W}/gen")
    erase = ("erase", "-m", MODEL, "-c", "circle", "--method", "uce", "-o", "{W}/new.safetensors")
    cases = [
        ("paths", "prompts file missing", (*gen, "--prompts-file", "{W}/missing.txt"), "does not exist"),
        ("paths", "prompts file is a FIFO", (*gen, "--prompts-file", "{W}/fifo.txt"), "named pipe"),
        ("paths", "prompts file is a folder", (*gen, "--prompts-file", "{W}/folder"), "is a folder"),
        ("paths", "model path is a FIFO", ("generate", "-m", "{W}/fifo.safetensors", "-p", "x", "-o", "{W}/gen"), "named pipe"),
        ("paths", "export -e E -o E", ("export", "-m", MODEL, "-e", "{W}/e.safetensors", "-o", "{W}/e.safetensors",
                                       "--overwrite"), "also an input"),
        ("paths", "to-lora E -o E", ("to-lora", "{W}/e.safetensors", "-o", "{W}/e.safetensors", "--overwrite"), "also an input"),
        ("paths", "export-lora E -o E", ("export-lora", "{W}/e.safetensors", "-o", "{W}/e.safetensors"), "also an input"),
        ("paths", "merge A B -o A", ("merge", "{W}/e.safetensors", "{W}/f.safetensors", "--method", "stack", "-o",
                                     "{W}/e.safetensors", "--overwrite"), "also an input"),
        ("paths", "output is a hard link to an input", ("to-lora", "{W}/e.safetensors", "-o", "{W}/link.safetensors",
                                                        "--overwrite"), "also an input"),
        ("paths", "output is sub/../input", ("to-lora", "{W}/e.safetensors", "-o", "{W}/nowhere/../e.safetensors",
                                             "--overwrite"), "also an input"),
        ("paths", "existing output without --overwrite", (*erase[:-1], "{W}/existing.safetensors"), "--overwrite"),
        ("paths", "output is a folder", (*erase[:-1], "{W}/folder.safetensors"), "is a folder"),
        ("paths", "output under a file", (*erase[:-1], "{W}/existing.safetensors/x.safetensors"), "is not a folder"),
        ("paths", "edit is a FIFO", (*gen, "-e", "{W}/fifo.safetensors"), "named pipe"),
        ("numbers", "--steps 0", (*gen, "--steps", "0"), "--steps must be an integer from 1 to 1000"),
        ("numbers", "--steps 1001", (*gen, "--steps", "1001"), "from 1 to 1000"),
        ("numbers", "--steps abc", (*gen, "--steps", "abc"), "--steps"),
        ("numbers", "--guidance nan", (*gen, "--guidance", "nan"), "--guidance must be a finite number"),
        ("numbers", "--guidance inf", (*gen, "--guidance", "inf"), "--guidance must be a finite number"),
        ("numbers", "--guidance -1", (*gen, "--guidance", "-1"), "from 0 to 100"),
        ("numbers", "--height 0", (*gen, "--height", "0"), "--height must be an integer from 8"),
        ("numbers", "--height 100", (*gen, "--height", "100"), "multiple of 8"),
        ("numbers", "--width 99999", (*gen, "--width", "99999"), "to 8192"),
        ("numbers", "--batch-size 0", (*gen, "--batch-size", "0"), "--batch-size"),
        ("numbers", "merge --weight nan", ("merge", "{W}/e.safetensors", "{W}/f.safetensors", "--method", "lora-sum",
                                           "--weight", "nan", "--weight", "1", "-o", "{W}/m.safetensors"), "--weight"),
        ("numbers", "export-lora --rank 0", ("export-lora", "{W}/e.safetensors", "--rank", "0", "-o", "{W}/l.safetensors"),
         "--rank"),
        ("numbers", "--edit E:inf", (*gen, "-e", "{W}/e.safetensors:inf"), "finite number"),
        ("numbers", "--edit E:1000", (*gen, "-e", "{W}/e.safetensors:1000"), "from -100 to 100"),
        ("numbers", "erase --seed -1", (*erase, "--seed", "-1"), "--seed"),
        ("numbers", "world check --seeds 0", ("world", "check", "--seeds", "0"), "--seeds"),
        ("numbers", "world train --unet-lr nan", ("world", "train", "-o", "{W}/wt", "--unet-lr", "nan"), "--unet-lr"),
    ]
    for text, expect in [("5-2", "runs backwards"), ("a", "not an integer"), ("0,,1", "empty item"),
                         ("0,", "empty item"), ("0,0", "listed twice"), ("0-5,3", "listed twice"),
                         ("-3", "not an integer"), ("0-99999", "at most 10000: split it into runs"),
                         ("99999999999999999999", "not an integer"), ("9223372036854775808", "largest seed"),
                         (" ", "No seeds given")]:
        cases.append(("seeds", f"--seeds '{text}'", (*gen, f"--seeds={text}"), expect))
    for name, expect in [("attr", "{0.__class__}"), ("named", "{x}"), ("twice", "2 times"), ("none", "0 times"),
                         ("index", "{[0]}"), ("conversion", "{!r}"), ("spec", "{:>10}"), ("brace", "literal braces")]:
        cases.append(("templates", f"erase config template: {name}", (*erase[:-4], "--config", f"{{W}}/tpl-{name}.yaml",
                                                                       "-o", "{W}/new.safetensors"), expect))
    cases += [
        ("templates", "bench templates: {0.__class__}", ("bench", "{W}/bench-attr.yaml", "-o", "{W}/run"), "{0.__class__}"),
        ("templates", "bench eval_templates: {x}", ("bench", "{W}/bench-eval.yaml", "-o", "{W}/run"), "{x}"),
    ]
    for name, expect in [("huge.png", "decompression-bomb"), ("wide.png", "9000x10"), ("many.png", "8192x8000"),
                         ("deep16.png", "pixel mode I;16"), ("float.tiff", "pixel mode F"),
                         ("truncated.png", "cannot be read"), ("text.png", "cannot be read"),
                         ("fifo.png", "named pipe"), ("empty", "No images in"), ("with-huge", "decompression-bomb")]:
        cases.append(("images", f"--images {name}", (*erase, "--images", f"{{W}}/images/{name}"), expect))
    for name, expect in [("bomb", "alias bomb"), ("dup", "duplicate key 'method'"), ("big", "MiB is read"),
                         ("rec", "recursive"), ("deep", "nested too deeply"), ("tab", "invalid YAML"),
                         ("latin1", "not UTF-8"), ("python", "invalid YAML"), ("typo", "unknown key"),
                         ("list", "expected a mapping"), ("fifo", "named pipe")]:
        cases.append(("yaml", f"--config {name}.yaml", (*erase[:-4], "--config", f"{{W}}/{name}.yaml", "-o",
                                                        "{W}/new.safetensors"), expect))
    cases.append(("yaml", "bench alias bomb", ("bench", "{W}/bomb.yaml", "-o", "{W}/run"), "alias bomb"))
    for name, expect in [("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("deep", "nested more than 64"),
                         ("bigmeta", "MiB of JSON"), ("notobject", "not a JSON object"), ("truncated", "not a valid safetensors"),
                         ("pickle.pt", "Pickled files"), ("mismatch", "weight shape"), ("foreign", "computed on base model"),
                         ("huge", "more than 100x the norm of its weights")]:
        file = name if "." in name else f"{name}.safetensors"
        scale = ":20" if name == "huge" else ""
        cases.append(("edits", f"--edit {file}", (*gen, "-e", f"{{W}}/{file}{scale}"), expect))
    cases += [
        ("edits", "-e E -e E", (*gen, "-e", "{W}/e.safetensors", "-e", "{W}/e.safetensors"), "same edit"),
        ("edits", "-e E -e copy-of-E", (*gen, "-e", "{W}/e.safetensors", "-e", "{W}/e2.safetensors"), "same edit"),
        ("edits", "merge E E", ("merge", "{W}/e.safetensors", "{W}/e2.safetensors", "--method", "stack", "-o",
                                "{W}/m.safetensors"), "merging an edit with itself"),
    ]
    return [Case(category, name, tuple(args), expect) for category, name, args, expect in cases]


# -- the scratch folder ------------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _edit_files(work: Path) -> None:
    """Edit files for builtin:shapes: valid ones and every kind of broken one."""
    import diffusers
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from conceptsmith.attention import kv_projections
    from conceptsmith.edits import Edit
    from conceptsmith.models import load_pipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe, info = load_pipeline(MODEL, dtype="float32", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    name, layer = next(iter(kv_projections(pipe.unet).items()))
    module = f"unet.{name}"
    generator = torch.Generator().manual_seed(0)

    def edit(base: str, deltas: dict) -> Edit:
        return Edit.from_weight_deltas("reliability", ["circle"], {}, base, info.family, deltas)

    def low_rank(scale: float) -> tuple:
        return (torch.randn(layer.out_features, 2, generator=generator) * scale,
                torch.randn(2, layer.in_features, generator=generator) * scale)

    edit(info.fingerprint, {module: low_rank(0.01)}).save(work / "e.safetensors")
    shutil.copy(work / "e.safetensors", work / "e2.safetensors")
    os.link(work / "e.safetensors", work / "link.safetensors")
    edit(info.fingerprint, {module: low_rank(0.01)}).save(work / "f.safetensors")
    edit("0" * 16, {module: low_rank(0.01)}).save(work / "foreign.safetensors")
    edit(info.fingerprint, {module: torch.zeros(layer.out_features + 1, layer.in_features)}).save(work / "mismatch.safetensors")
    weight_norm = float(layer.weight.detach().norm())
    up, down = low_rank(1.0)
    big = up @ down
    edit(info.fingerprint, {module: big * (10 * weight_norm / float(big.norm()))}).save(work / "huge.safetensors")
    with safe_open(str(work / "e.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(work / "e.safetensors"))
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        broken = {key: tensor.clone() for key, tensor in tensors.items()}
        next(iter(broken.values())).view(-1)[3] = value
        save_file(broken, str(work / f"{name}.safetensors"), metadata=metadata)
    for name, header in (("deep", "[" * 1000 + "]" * 1000), ("notobject", "[1, 2]"),
                         ("bigmeta", json.dumps({"padding": "x" * (17 * 2**20)}))):
        save_file(tensors, str(work / f"{name}.safetensors"), metadata={**metadata, "conceptsmith": header})
    (work / "truncated.safetensors").write_bytes((work / "e.safetensors").read_bytes()[:100])
    (work / "pickle.pt").write_bytes(b"\x80\x04\x95 pickled")


def _images(folder: Path) -> None:
    from PIL import Image

    folder.mkdir()
    (folder / "huge.png").write_bytes(_png_header(20000, 20000))
    (folder / "wide.png").write_bytes(_png_header(9000, 10))
    (folder / "many.png").write_bytes(_png_header(8192, 8000))
    Image.new("I;16", (16, 16)).save(folder / "deep16.png")
    Image.new("F", (16, 16)).save(folder / "float.tiff")
    Image.new("RGB", (32, 32), "red").save(folder / "good.png")
    (folder / "truncated.png").write_bytes((folder / "good.png").read_bytes()[:60])
    (folder / "text.png").write_text("not an image")
    os.mkfifo(folder / "fifo.png")
    (folder / "empty").mkdir()
    (folder / "with-huge").mkdir()
    shutil.copy(folder / "good.png", folder / "with-huge" / "a.png")
    shutil.copy(folder / "huge.png", folder / "with-huge" / "b.png")


def _configs(work: Path) -> None:
    templates = {"attr": "{0.__class__}", "named": "a {x}", "twice": "{} and {}", "none": "a photo",
                 "index": "{[0]}", "conversion": "{!r}", "spec": "{:>10}", "brace": "a { b"}
    for name, template in templates.items():
        (work / f"tpl-{name}.yaml").write_text(f"method: esd\nparams:\n  templates: [{json.dumps(template)}]\n")
    smoke = (ROOT / "configs" / "bench" / "shapes-smoke.yaml").read_text()
    (work / "bench-attr.yaml").write_text(smoke.replace('templates: ["a picture of a circle by {}"]',
                                                        'templates: ["a picture of a circle by {0.__class__}"]'))
    (work / "bench-eval.yaml").write_text(smoke.replace('eval_templates: ["a picture by {}"',
                                                        'eval_templates: ["a picture by {x}"'))
    bomb = "method: esd\nparams:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"  {b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True))
    (work / "bomb.yaml").write_text(bomb)
    (work / "dup.yaml").write_text("method: esd\nparams: {}\nmethod: uce\n")
    (work / "big.yaml").write_text("method: esd\nparams: {x: '" + "y" * 2**21 + "'}\n")
    (work / "rec.yaml").write_text("method: esd\nparams: &p {self: *p}\n")
    (work / "deep.yaml").write_text("method: esd\nparams: {x: " + "[" * 50_000 + "]" * 50_000 + "}\n")
    (work / "tab.yaml").write_text("method: esd\n\tparams: {}\n")
    (work / "latin1.yaml").write_bytes(b"method: esd\nparams: {guide: caf\xe9}\n")
    (work / "python.yaml").write_text("method: !!python/object/apply:os.system ['echo hacked']\n")
    (work / "typo.yaml").write_text("method: esd\nparms: {}\n")
    (work / "list.yaml").write_text("- method\n- esd\n")
    os.mkfifo(work / "fifo.yaml")


def prepare(work: Path) -> None:
    """Every file the cases name."""
    (work / "folder").mkdir()
    (work / "folder.safetensors").mkdir()
    os.mkfifo(work / "fifo.txt")
    os.mkfifo(work / "fifo.safetensors")
    (work / "existing.safetensors").write_bytes(b"an earlier result")
    _edit_files(work)
    _images(work / "images")
    _configs(work)


# -- running -----------------------------------------------------------------------------------------------


def materialize(pristine: Path, work: Path) -> None:
    """A copy of ``pristine`` at ``work`` with its FIFOs (made anew, never opened) and hard links (linked again)."""
    import stat

    work.mkdir()
    first_copy: dict[int, Path] = {}
    for source in sorted(pristine.rglob("*")):
        target = work / source.relative_to(pristine)
        info = source.lstat()
        if stat.S_ISDIR(info.st_mode):
            target.mkdir()
        elif stat.S_ISFIFO(info.st_mode):
            os.mkfifo(target)
        elif info.st_ino in first_copy:
            os.link(first_copy[info.st_ino], target)
        else:
            shutil.copyfile(source, target)
            first_copy[info.st_ino] = target


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if "cache" not in p.relative_to(folder).parts}


def run_case(case: Case, pristine: Path, work: Path, timeout: float) -> dict:
    materialize(pristine, work)
    args = [arg.replace("{W}", str(work)) for arg in case.args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CONCEPTSMITH_CACHE": str(work / "cache"), "NO_COLOR": "1"}
    before = _listing(work)
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "conceptsmith", *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=timeout)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired:
        code, stdout, stderr = None, "", f"no answer within {timeout:g} s"
    seconds = time.perf_counter() - started
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    changed = sorted(set(_listing(work).items()) ^ set(before.items()))
    shutil.rmtree(work)
    if "Traceback" in stdout + stderr or code not in (0, 2, None):
        verdict = "traceback"
    elif code == 2 and len(errors) == 1 and case.expect in errors[0] and not changed:
        verdict = "clean"
    else:
        verdict = "wrong"
    shown = (errors[0] if errors else (stderr.strip().splitlines() or [""])[-1]).replace(str(work), "$W")
    return {"category": case.category, "case": case.name, "args": [arg.replace("{W}", "$W") for arg in case.args], "exit_code": code,
            "error": shown, "expected": case.expect,
            "files_changed": [name for name, _ in changed][:5], "verdict": verdict, "seconds": round(seconds, 2)}


def summarize(results: list[dict]) -> list[dict]:
    table = []
    for category in dict.fromkeys(r["category"] for r in results):
        rows = [r for r in results if r["category"] == category]
        table.append({"category": category, "cases": len(rows),
                      "clean_exit_2": sum(r["verdict"] == "clean" for r in rows),
                      "tracebacks": sum(r["verdict"] == "traceback" for r in rows),
                      "wrong": sum(r["verdict"] == "wrong" for r in rows),
                      "median_s": round(statistics.median(r["seconds"] for r in rows), 1)})
    return table


def markdown(table: list[dict], results: list[dict], stamp: str, before: dict | None = None) -> str:
    lines = [
        "# Reliability: bad input through the command line",
        "",
        f"`python bench/fuzz_report.py` ({stamp}): each case runs `python -m conceptsmith ARGS` in a fresh process "
        "(one torch thread, CPU) in a scratch folder. *Clean*: exit code 2, one `error: ...` line naming the problem, "
        "no file written or changed. *Tracebacks*: a Python traceback or an exit code other than 0 / 2. *Wrong*: "
        "accepted, refused without naming the problem, files written, or no answer within the timeout. "
        "*Median s*: time to the answer, mostly Python and torch start-up; cases that reach the model load "
        "`builtin:shapes` first. Every case, its arguments and its error line: `reliability.json`.",
        "",
    ]
    old = {row["category"]: row for row in (before or {}).get("table", [])}
    extra = " before: clean / tracebacks / wrong |" if old else ""
    lines += [f"| category | cases | clean exit 2 | tracebacks | wrong | median s |{extra}",
              "|---|---:|---:|---:|---:|---:|" + ("---:|" if old else "")]

    def earlier(row: dict) -> str:
        return f" {row['clean_exit_2']} / {row['tracebacks']} / {row['wrong']} |" if row else " |"

    lines += [f"| {r['category']} | {r['cases']} | {r['clean_exit_2']} | {r['tracebacks']} | {r['wrong']} | {r['median_s']} |"
              + (earlier(old.get(r["category"], {})) if old else "") for r in table]
    keys = ("cases", "clean_exit_2", "tracebacks", "wrong")
    total = {key: sum(r[key] for r in table) for key in keys}
    old_total = {key: sum(r[key] for r in old.values()) for key in keys}
    lines.append(f"| **all** | {total['cases']} | {total['clean_exit_2']} | {total['tracebacks']} | {total['wrong']} | |"
                 + (earlier(old_total) if old else ""))
    if old:
        reworded = [r for r in before["cases"] if r["verdict"] == "wrong" and r["exit_code"] == 2
                    and str(r["error"]).startswith("error: ")]
        lines += ["", f"*Before*: the same cases on {before['label']}. {len(reworded)} of its *wrong* cases were "
                  "one-line refusals without this report's expected phrase (a few named the problem in other words, "
                  "e.g. after loading the model; most were misleading, e.g. a FIFO reported as missing: "
                  "`reliability.json` has each line); the others ran (exit 0: images "
                  "generated, an edit written over its input), hung, or printed a multi-line usage box (unknown "
                  "options such as `--overwrite`, which did not exist)."]
    bad = [r for r in results if r["verdict"] != "clean"]
    if bad:
        lines += ["", "Cases that were not clean:", ""]
        lines += [f"- {r['category']} / {r['case']}: {r['verdict']}, exit {r['exit_code']}: `{r['error']}`" for r in bad]
    lines += ["", "One error line per category (the first case):", ""]
    for category in dict.fromkeys(r["category"] for r in results):
        first = next(r for r in results if r["category"] == category)
        lines.append(f"- {category} ({first['case']}): `{first['error']}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated categories (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reliability.json")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as a hang")
    parser.add_argument("--baseline", type=Path, help="an earlier reliability.json, shown as 'before' columns")
    parser.add_argument("--baseline-label", default="an earlier checkout", help="what the baseline ran on")
    args = parser.parse_args()
    cases = _cases()
    if args.only:
        wanted = set(args.only.split(","))
        cases = [case for case in cases if case.category in wanted]
    scratch = Path(tempfile.mkdtemp(prefix="conceptsmith-reliability-"))
    try:
        (scratch / "pristine").mkdir()
        prepare(scratch / "pristine")
        results = []
        for index, case in enumerate(cases):
            results.append(run_case(case, scratch / "pristine", scratch / f"case-{index}", args.timeout))
            row = results[-1]
            print(f"{row['verdict']:<9} {row['category']:<9} {row['case']:<40} {row['seconds']:6.1f} s  {row['error']}",
                  flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = summarize(results)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    from conceptsmith.io import write_json, write_text

    before = None
    if args.baseline is not None:
        earlier = json.loads(args.baseline.read_text(encoding="utf-8"))
        before = {"label": args.baseline_label, "table": earlier["table"], "cases": earlier["cases"]}
    report = {"generated": stamp, "command": "python bench/fuzz_report.py", "model": MODEL, "table": table,
              "cases": results, **({"before": before} if before else {})}
    write_json(args.out, report)
    text = markdown(table, results, stamp, before)
    write_text(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
