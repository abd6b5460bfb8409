"""Closed-form erasure performance benchmark -> ``bench/results/closed_form.json``.

Setting: the full-size Stable Diffusion 1.5 architecture (``UNet2DConditionModel`` + CLIP ViT-L/14
text encoder, configs below as dicts) with random fp32 weights (nothing is downloaded), on the CPU
with ``--threads`` threads (2). UCE erases 1, 10, 100 and 1000 concepts (guide "art") with 100
preserved concepts, once through the library (``get_editor("uce")``: the shared solver, causal short
encodings) and once through a reference written the way published research code does it, timed in
the same run: every prompt encoded on its own and padded to 77 tokens, a Python loop over the 32 K/V
layers, inside it a loop over concepts that recomputes every layer's guide/preserve values for each
layer and accumulates outer products, then a per-layer fp32 ``torch.inverse``.

Keys (maps from the count "1", "10", "100", "1000"):
``encode_s`` text encoding inside ``fit``; ``uce_solve_apply_s`` everything else (validation, solve,
building the Edit, ``edit.apply``); ``total_s`` ``fit`` + ``apply``; ``total_s_preserve_cached`` the same
with the 100 preserved concepts' encodings read from the library's cache (filled by an earlier edit);
``speedup_vs_reference`` reference time / ``total_s`` (no cache). ``peak_rss_mb``: the process's peak
RSS while the library runs (the kernel's mark is reset before each run). ``max_rel_diff_vs_reference``:
max over counts and projections of ``||W_lib - W_ref||_F / ||W_ref||_F`` where ``W_ref`` is the
reference's formula on the reference's own token rows (77-token encodings, index = real tokens - 2),
evaluated in float64; ``details`` also compares with the fp32 reference as run (whose fp32 inverse of
a matrix with condition number ~1e5 is itself off by more than that) and on the update ``W - W_old``.
Library timings are the best of ``--repeats`` runs after a warm-up edit; load averages are recorded
because the CPU may be shared.

``fingerprint_s``: one call of ``conceptsmith.models.fingerprint`` (the base identity: every tensor of the
UNet, the text encoder and SD 1.5's VAE hashed whole, plus a scheduler's config), best of ``--repeats``;
``details.fingerprint`` has every run and the bytes hashed. ``--only fingerprint`` measures just that and
merges it into ``--out``, keeping the other numbers.

Run: ``.venv/bin/python bench/closed_form.py`` (``--counts 1 10`` for a quick look, ``--arch tiny`` to
smoke-test the script in seconds).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conceptsmith.architectures import CLIP_VIT_L_TEXT, SD15_UNET  # noqa: E402  (after the sys.path line)

# A small stand-in with the same structure, only to smoke-test this script (``--arch tiny``).
TINY_UNET = dict(SD15_UNET, block_out_channels=(32, 64, 64, 64), cross_attention_dim=64, norm_num_groups=16, attention_head_dim=4)
TINY_TEXT = dict(CLIP_VIT_L_TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
SD15_VAE = dict(  # runwayml/stable-diffusion-v1-5 vae/config.json
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
TINY_VAE = dict(SD15_VAE, block_out_channels=(16, 32, 32, 32), norm_num_groups=16)
SD15_SCHEDULER = dict(  # its scheduler/scheduler_config.json (PNDMScheduler)
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
)
COUNTS = (1, 10, 100, 1000)
N_PRESERVE = 100
GUIDE = "art"


# -- model ---------------------------------------------------------------------------------------------


def fill_random(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter random values fast: one block of N(0, 1) samples is drawn once and each
    weight copies a random window of it, scaled by 1/sqrt(fan_in) (norm weights 1, biases 0)."""
    params = [(mod, name, p) for mod in module.modules() for name, p in mod._parameters.items() if p is not None]
    largest = max(p.numel() for _, _, p in params)
    block = torch.randn(largest + 4096, generator=generator)
    with torch.no_grad():
        for mod, name, p in params:
            tensor = torch.empty(p.shape, dtype=torch.float32)
            if name == "bias":
                tensor.zero_()
            elif p.ndim == 1:
                tensor.fill_(1.0)
            else:
                start = int(torch.randint(0, block.numel() - p.numel() + 1, (1,), generator=generator))
                fan_in = p[0].numel()
                torch.mul(block[start : start + p.numel()].view(p.shape), fan_in**-0.5, out=tensor)
            mod._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
    del block


def build_sd15(seed: int = 0, tiny: bool = False) -> SimpleNamespace:
    """UNet + text encoder + tokenizer of SD 1.5's architecture, random fp32 weights (``tiny``: the smoke-test stand-in)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from conceptsmith.world.tokenizer import clip_tokenizer

    generator = torch.Generator().manual_seed(seed)
    with init_empty_weights(include_buffers=False):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        text_encoder = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT if tiny else CLIP_VIT_L_TEXT)))
    fill_random(unet, generator)
    fill_random(text_encoder, generator)
    return SimpleNamespace(unet=unet.eval(), text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer())


def measure_fingerprint(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """Time ``conceptsmith.models.fingerprint`` on UNet + text encoder + VAE + scheduler and merge ``fingerprint_s``
    (and ``details.fingerprint``) into ``args.out``."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, PNDMScheduler

    from conceptsmith.io import write_json
    from conceptsmith.models import fingerprint

    tiny = args.arch == "tiny"
    pipe = build_sd15(tiny=tiny)
    with init_empty_weights(include_buffers=False):
        pipe.vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
    fill_random(pipe.vae, torch.Generator().manual_seed(1))
    pipe.scheduler = PNDMScheduler(**SD15_SCHEDULER)
    modules = (pipe.unet, pipe.text_encoder, pipe.vae)
    hashed = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    runs, identity = [], None
    for _ in range(args.repeats):
        gc.collect()
        t0, t0_cpu = time.perf_counter(), time.process_time()
        identity = fingerprint(pipe)
        runs.append({"s": time.perf_counter() - t0, "cpu_s": time.process_time() - t0_cpu})
    best = min(run["s"] for run in runs)
    report = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else {"details": {}}
    report["fingerprint_s"] = best
    report.setdefault("details", {})["fingerprint"] = {
        "runs": runs,
        "components": sorted(identity.components),
        "tensors_mb_as_loaded_fp32": hashed / 2**20,
        "gb_per_s": hashed / 2**30 / best,
        "threads": torch.get_num_threads(),
        "arch": args.arch,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "command": "python bench/closed_form.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_json(args.out, report)
    print(json.dumps({"fingerprint_s": best, **report["details"]["fingerprint"]}, indent=2))
    return report


# -- the concepts ----------------------------------------------------------------------------------------

_FIRST = (
    "anna", "john", "maria", "paul", "clara", "peter", "emma", "george", "lucy", "henry", "alice", "thomas",
    "rosa", "victor", "helen", "oscar", "julia", "frank", "nina", "hugo", "sofia", "leon", "ella", "max",
    "ivan", "laura", "otto", "vera", "felix", "mia", "carl", "ines", "pablo", "greta", "louis", "eva",
    "diego", "olga", "marco", "ada",
)
_LAST = (
    "miller", "turner", "baker", "hill", "stone", "wood", "fisher", "hunter", "moore", "young", "king", "wright",
    "green", "carter", "parker", "cole", "ward", "fox", "grant", "hayes", "reed", "bell", "brooks", "price",
    "black", "west", "lane", "rivers", "marsh", "frost", "knight", "hale", "banks", "cross", "burns", "gray",
    "page", "rhodes", "shaw", "holt",
)


def names(n: int, seed: int) -> list[str]:
    """``n`` distinct artist-like names ("clara frost", "ella van hale"), deterministic; 2-3 words, one CLIP
    token per word, so 4-5 tokens with BOS and EOS, like most real artist names."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(_FIRST) * len(_LAST), generator=generator).tolist()
    if n > len(order):
        raise ValueError(f"at most {len(order)} names")
    particles = ("", "", "van ", "de ", "")  # some names get a particle, like "vincent van gogh"
    return [f"{_FIRST[i // len(_LAST)]} {particles[i % 5]}{_LAST[i % len(_LAST)]}" for i in order[:n]]


# -- the reference -----------------------------------------------------------------------------------------


def reference_uce(pipe, erase, guide, preserve, *, lamb=0.5, erase_scale=1.0, preserve_scale=1.0):
    """UCE as published research code computes it (see module doc).

    Returns ``({module path: new W}, {text: its token row})`` (the rows feed :func:`reference_in_float64`)."""
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    names_, modules = [], []
    for name, module in unet.named_modules():
        if "attn2" in name and (name.endswith("to_k") or name.endswith("to_v")):
            names_.append(name)
            modules.append(module)
    originals = copy.deepcopy(modules)

    embeddings = {}
    for text in [*erase, guide, *preserve]:
        if text in embeddings:
            continue
        tokens = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        states = text_encoder(tokens.input_ids)[0]
        last = int(tokens.attention_mask.sum()) - 2
        embeddings[text] = states[:, last, :]

    new_weights = {}
    for layer, module in enumerate(originals):
        w_old = module.weight
        mat1 = lamb * w_old
        mat2 = lamb * torch.eye(w_old.shape[1])
        for concept in erase:
            c = embeddings[concept].T
            values = [m(embeddings[guide]) for m in originals]  # every layer's value, recomputed per layer
            v = values[layer].T
            mat1 = mat1 + erase_scale * (v @ c.T)
            mat2 = mat2 + erase_scale * (c @ c.T)
        for concept in preserve:
            c = embeddings[concept].T
            values = [m(embeddings[concept]) for m in originals]
            v = values[layer].T
            mat1 = mat1 + preserve_scale * (v @ c.T)
            mat2 = mat2 + preserve_scale * (c @ c.T)
        new_weights[f"unet.{names_[layer]}"] = (mat1 @ torch.inverse(mat2)).detach()
    return new_weights, embeddings


def reference_in_float64(pipe, embeddings, erase, guide, preserve, *, lamb=0.5, erase_scale=1.0, preserve_scale=1.0):
    """The reference's formula on the reference's own token rows, per layer ``mat1 @ inverse(mat2)``, in float64
    (not timed): separates what the library computes differently from what fp32 ``torch.inverse`` loses."""
    c_e = torch.cat([embeddings[text] for text in erase]).double()
    c_g = embeddings[guide].double()
    c_p = torch.cat([embeddings[text] for text in preserve]).double()
    out = {}
    for name, module in pipe.unet.named_modules():
        if "attn2" in name and (name.endswith("to_k") or name.endswith("to_v")):
            w = module.weight.detach().double()
            v_e = (c_g @ w.T).expand(c_e.shape[0], -1)
            v_p = c_p @ w.T
            mat1 = lamb * w + erase_scale * v_e.T @ c_e + preserve_scale * v_p.T @ c_p
            mat2 = lamb * torch.eye(w.shape[1], dtype=torch.float64) + erase_scale * c_e.T @ c_e + preserve_scale * c_p.T @ c_p
            out[f"unet.{name}"] = mat1 @ torch.inverse(mat2)
    return out


# -- measurement helpers -------------------------------------------------------------------------------


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so that the next peak belongs to what runs next."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def run_library(pipe, concepts, preserve, cache_dir=None):
    """``fit`` + ``apply`` through the library; ``cache_dir`` lets it cache the preserve encodings there."""
    from conceptsmith.registry import EditRequest, get_editor

    config = {"concept_type": "art", "cache_preserve": cache_dir is not None, "cache_dir": cache_dir}
    editor = get_editor("uce")(config)
    request = EditRequest(concepts=list(concepts), guide=GUIDE, preserve=list(preserve))
    start, start_cpu = time.perf_counter(), time.process_time()
    edit = editor.fit(pipe, request)
    fitted = time.perf_counter()
    edit.apply(pipe)
    done, done_cpu = time.perf_counter(), time.process_time()
    return edit, {
        "encode_s": edit.metadata["timing_s"]["encode"],
        "fit_s": fitted - start,
        "apply_s": done - fitted,
        "total_s": done - start,
        "uce_solve_apply_s": done - start - edit.metadata["timing_s"]["encode"],
        # CPU seconds of all threads: on an idle machine with one thread, what the wall times would be
        "encode_cpu_s": edit.metadata["cpu_s"]["encode"],
        "total_cpu_s": done_cpu - start_cpu,
        "uce_solve_apply_cpu_s": done_cpu - start_cpu - edit.metadata["cpu_s"]["encode"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--repeats", type=int, default=2, help="library timings: best of this many runs (1000: one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference")
    parser.add_argument("--arch", choices=("sd15", "tiny"), default="sd15", help="tiny: smoke-test the script only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "closed_form.json")
    parser.add_argument("--only", choices=("fingerprint",), help="fingerprint: measure fingerprint_s alone, merged into --out")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.only == "fingerprint":
        return measure_fingerprint(args, argv)
    load_before = os.getloadavg()

    started = time.perf_counter()
    pipe = build_sd15(tiny=args.arch == "tiny")
    build_s = time.perf_counter() - started
    model_bytes = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.text_encoder) for p in m.parameters())
    gc.collect()
    rss_after_load = _status_mb("VmRSS")

    all_names = names(max(args.counts) + N_PRESERVE + 1, seed=1)
    preserve = all_names[:N_PRESERVE]
    warmup_concept = all_names[N_PRESERVE]
    concepts = all_names[N_PRESERVE + 1 :]

    cache_dir = tempfile.mkdtemp(prefix="cs-bench-cache-")
    # warm-up (first-call costs: tokenizer caches, thread pools); recorded, not counted. It also fills
    # the preserve-encoding cache used by the "preserve_cached" runs.
    edit, first_call = run_library(pipe, [warmup_concept], preserve, cache_dir)
    edit.revert(pipe)
    del edit

    results: dict[str, dict] = {}
    peaks, overheads, can_reset = [], [], True
    for count in args.counts:
        entry: dict = {}
        edited = None
        for mode, cache in (("", None), ("_preserve_cached", cache_dir)):
            runs = []
            repeats = 1 if count >= 1000 else args.repeats
            for repeat in range(repeats):
                gc.collect()
                can_reset = reset_peak_rss() and can_reset
                before = _status_mb("VmRSS")
                edit, timing = run_library(pipe, concepts[:count], preserve, cache)
                timing["peak_rss_mb"] = _status_mb("VmHWM")
                timing["rss_before_mb"] = before
                timing["overhead_mb"] = timing["peak_rss_mb"] - before
                peaks.append(timing["peak_rss_mb"])
                overheads.append(timing["overhead_mb"])
                if cache is not None and repeat == repeats - 1:  # keep the result once the peaks are measured
                    edited = {n: pipe.unet.get_submodule(n.removeprefix("unet.")).weight.detach().clone() for n in edit.module_shapes}
                    info = edit.metadata["closed_form"]
                edit.revert(pipe)
                runs.append(timing)
                del edit
            best = min(runs, key=lambda r: r["total_s"])
            entry.update({f"{key}{mode}": value for key, value in best.items()})
            entry[f"runs{mode}"] = runs
        entry.update({key: info[key] for key in ("condition_number", "rank", "max_edit_residual", "max_preserve_residual")})
        if not args.no_reference:
            gc.collect()
            t0, t0_cpu = time.perf_counter(), time.process_time()
            reference, rows = reference_uce(pipe, concepts[:count], GUIDE, preserve)
            entry["reference_s"] = time.perf_counter() - t0
            entry["reference_cpu_s"] = time.process_time() - t0_cpu
            entry["speedup_vs_reference_cpu"] = entry["reference_cpu_s"] / entry["total_cpu_s"]
            entry["speedup_vs_reference"] = entry["reference_s"] / entry["total_s"]
            entry["speedup_vs_reference_preserve_cached"] = entry["reference_s"] / entry["total_s_preserve_cached"]
            exact = reference_in_float64(pipe, rows, concepts[:count], GUIDE, preserve)
            original = {n: pipe.unet.get_submodule(n.removeprefix("unet.")).weight.detach() for n in reference}
            entry["max_rel_diff_weights"] = max(rel_diff(edited[n], exact[n]) for n in exact)
            entry["max_rel_diff_update"] = max(rel_diff(edited[n] - original[n], exact[n] - original[n]) for n in exact)
            entry["max_rel_diff_weights_vs_fp32_reference"] = max(rel_diff(edited[n], reference[n]) for n in reference)
            entry["fp32_reference_vs_float64_weights"] = max(rel_diff(reference[n], exact[n]) for n in exact)
            entry["fp32_reference_vs_float64_update"] = max(
                rel_diff(reference[n] - original[n], exact[n] - original[n]) for n in exact
            )
            del reference, exact, rows
        del edited
        results[str(count)] = entry
        print(f"{count:5d} concepts: " + ", ".join(f"{k}={v:.4g}" for k, v in entry.items() if isinstance(v, float)), flush=True)
    shutil.rmtree(cache_dir, ignore_errors=True)

    peak = max(peaks)
    summary = {
        "encode_s": {k: v["encode_s"] for k, v in results.items()},
        "uce_solve_apply_s": {k: v["uce_solve_apply_s"] for k, v in results.items()},
        "total_s": {k: v["total_s"] for k, v in results.items()},
        "total_s_preserve_cached": {k: v["total_s_preserve_cached"] for k, v in results.items()},
        "cpu_s": {
            key: {k: v[key] for k, v in results.items()}
            for key in ("encode_cpu_s", "uce_solve_apply_cpu_s", "total_cpu_s", "total_cpu_s_preserve_cached")
        },
        "speedup_vs_reference": {k: v.get("speedup_vs_reference") for k, v in results.items()},
        "peak_rss_mb": peak,
        "memory_overhead_frac_of_model": max(overheads) / (model_bytes / 2**20),
        "max_rel_diff_vs_reference": max((v["max_rel_diff_weights"] for v in results.values() if "max_rel_diff_weights" in v), default=None),
    }
    report = {
        **summary,
        "details": {
            "per_count": results,
            "first_call": first_call,
            "model_mb": model_bytes / 2**20,
            "rss_after_load_mb": rss_after_load,
            "memory_overhead_mb": max(overheads),
            "memory_overhead_frac_of_model": max(overheads) / (model_bytes / 2**20),
            "memory_overhead_note": "max over runs of (peak RSS during the run - RSS just before it)",
            "peak_minus_rss_after_load_mb": peak - rss_after_load,
            "peak_is_per_run": can_reset,
            "build_s": build_s,
            "threads": torch.get_num_threads(),
            "arch": args.arch,
            "n_preserve": N_PRESERVE,
            "guide": GUIDE,
            "token_policy": "last_word",
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "command": "python bench/closed_form.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "max_rss_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return report


if __name__ == "__main__":
    main()
