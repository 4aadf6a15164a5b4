"""Regenerates every figure of README.md and docs/ from scratch: ``make docs-figures`` (``python docs/figures.py``).

It builds the demo's base model in an empty cache, runs each command the pages show, keeps what each printed under
``docs/figures/<job>.txt`` (the command first, then its standard output), copies the pictures into ``docs/images/``,
collects the numbers the pages quote into ``docs/figures/values.json`` and rewrites every region
``<!--fig:NAME-->...<!--/fig-->`` of the pages with the value ``NAME``. ``tests/test_docs_figures.py`` checks that the
pages hold exactly those values, so a page cannot drift from what its commands print. About an hour on 2 CPU cores;
``--only JOB ...`` reruns some jobs (the others' values are kept), ``--pages`` only rewrites the pages.

Runs go to ``outputs/docs-figures/`` (git-ignored), the base models to its ``cache/``; nothing reads the user's cache.
Every command runs with one torch thread per process, as the demo and the build do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = os.path.join(ROOT, "docs", "figures")
IMAGES = os.path.join(ROOT, "docs", "images")
WORK = os.path.join(ROOT, "outputs", "docs-figures")
CACHE = os.path.join(WORK, "cache")  # XDG_CACHE_HOME of every command: base models in CACHE/trl-forking
VALUES = os.path.join(FIGURES, "values.json")
PAGES = ["README.md", *(os.path.join("docs", name) for name in ("task.md", "analysis.md", "ablation.md", "recipes.md"))]
MARKER = re.compile(r"<!--fig:([\w.\-]+)-->(.*?)<!--/fig-->", re.DOTALL)
TEST_PROMPTS = "trl_forking/tasks/arithmetic_chains/data/test.jsonl"
EVAL_T1 = "--datasets arithmetic-chains --num_samples 8 --k 1 8 --temperature 1.0 --top_p 1.0 --max_new_tokens 48"
EVAL_T1 += " --backend transformers --batch_size 256"
ANALYZE = f"--prompts {TEST_PROMPTS} --num-samples 200 --num-generations 4 --max-new-tokens 48"
# How the experiment of docs/task.md varies the CPU kernels on one machine: (label, environment).
KERNELS = (
    ("as the CPU has them", {}),
    ("ATEN_CPU_CAPABILITY=default", {"ATEN_CPU_CAPABILITY": "default"}),
    ("MKL_CBWR=COMPATIBLE", {"MKL_CBWR": "COMPATIBLE"}),
)


def _env(**extra) -> dict[str, str]:
    env = {**os.environ, "XDG_CACHE_HOME": CACHE, "HF_HOME": os.path.join(WORK, "huggingface"), **extra}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run(job: str, command: str, **env) -> str:
    """Runs ``command`` (a shell line, from the repository root) and returns its standard output, which is also
    written to ``docs/figures/<job>.txt`` after the command; raises on a non-zero exit."""
    print(f"[{job}] $ {command}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, shell=True, cwd=ROOT, env=_env(**env), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"[{job}] failed with exit status {done.returncode}: {command}")
    os.makedirs(FIGURES, exist_ok=True)
    with open(os.path.join(FIGURES, f"{job}.txt"), "w") as f:
        f.write(f"$ {command}\n{done.stdout}")
    print(f"[{job}] {seconds:.0f} s", flush=True)
    return done.stdout


def timed(job: str, command: str, **env) -> tuple[str, float]:
    started = time.perf_counter()
    out = run(job, command, **env)
    return out, time.perf_counter() - started


def percent(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}%"


def signed(value: float) -> str:
    return f"{value:+.1f}"


def block(text: str, language: str = "text") -> str:
    """Returns ``text`` as a fenced code block, as the pages embed command output."""
    return f"\n```{language}\n{text.rstrip()}\n```\n"


def base_dir(seed: int = 0, *flags: str) -> str:
    """Returns the directory of the base model of the default recipe with ``--seed seed`` and ``flags``, built."""
    extra = " ".join(flags)
    return run(
        f"base-dir-{seed}",
        f"python -m trl_forking.scripts.base_model --seed {seed} --no-progress {extra}",
    ).split()[-1]


def _build_record(path: str) -> dict:
    with open(os.path.join(path, "build.json")) as f:
        return json.load(f)


def _eval_figures(out: str) -> tuple[float, float, float]:
    """Returns (pass@1, pass@8, standard error) from eval_aime's summary line of the bundled task."""
    match = re.search(r"avg@8 = ([\d.]+)% \(standard error ([\d.]+)%\), pass@1 = ([\d.]+)%, pass@8 = ([\d.]+)%", out)
    return float(match[3]) / 100, float(match[4]) / 100, float(match[2]) / 100


def _demo_figures(out: str) -> dict:
    """Returns before / after avg@4 and the change the demo printed, and its logged step lines."""
    before = float(re.search(r"before training: avg@4 = ([\d.]+)%", out)[1]) / 100
    after = float(re.search(r"after training:  avg@4 = ([\d.]+)%", out)[1]) / 100
    change = float(re.search(r"change: ([+-][\d.]+) points", out)[1])
    steps = re.findall(r"^step \d+/\d+  reward .*$", out, re.MULTILINE)
    rewards = [float(re.search(r"reward ([\d.]+)", line)[1]) for line in steps]
    return {"before": before, "after": after, "change": change, "steps": steps, "rewards": rewards}


# --- jobs: each returns the values it measured --------------------------------------------------------------------


def job_base(values: dict) -> dict:
    shutil.rmtree(os.path.join(CACHE, "trl-forking"), ignore_errors=True)  # an empty cache: a fresh machine's build
    out, seconds = timed("base", "python -m trl_forking.scripts.base_model --no-progress")
    path = out.split()[-1]
    record = _build_record(path)
    return {
        "base.sha": record["sha256"]["model.safetensors"][:12],
        "base.parameters": f"{record['num_parameters']:,}",
        "base.build_seconds": f"{seconds:.0f} s",
        "base.sft_seconds": f"{record['sft_seconds']:.0f} s",
        "base.cpu": record["cpu_capability"],
        "base.versions": ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
        "base.final_loss": f"{record['sft_log'][-1]['loss']:.4f}",
    }


def job_base_eval(values: dict) -> dict:
    base = base_dir()
    pass1, pass8, stderr = _eval_figures(
        run("base-eval", f"python recipes/eval_aime.py --model_name_or_path {base} {EVAL_T1} --output_dir {WORK}/eval")
    )
    greedy = run(
        "base-greedy",
        f"python recipes/eval_aime.py --model_name_or_path {base} --datasets arithmetic-chains --num_samples 1 --k 1 "
        f"--temperature 0.05 --max_new_tokens 48 --backend transformers --output_dir {WORK}/eval-greedy",
    )
    low = float(re.search(r"avg@1 = ([\d.]+)%", greedy)[1]) / 100
    return {
        "base.pass1": percent(pass1),
        "base.pass8": percent(pass8),
        "base.stderr": percent(stderr),
        "base.greedy": percent(low),
    }


def job_demo(values: dict) -> dict:
    shutil.rmtree(os.path.join(ROOT, "outputs", "forking-demo"), ignore_errors=True)
    out, seconds = timed("demo", "python recipes/grpo_forking.py")
    demo = _demo_figures(out)
    tail = out[out.index("Accuracy on the") :].replace(ROOT, "/abs/path").rstrip()
    return {
        "demo.before": percent(demo["before"]),
        "demo.after": percent(demo["after"]),
        "demo.change": signed(demo["change"]),
        "demo.seconds": f"{seconds:.0f} s",
        "demo.steps": block(f"{demo['steps'][0]}\n...\n{demo['steps'][-1]}", ""),
        "demo.tail": block(tail),
        "demo.reward_first": f"{demo['rewards'][0]:.2f}",
        "demo.reward_last": f"{demo['rewards'][-1]:.2f}",
    }


def job_demo_seeds(values: dict) -> dict:
    found = {}
    for seed in (1, 2):
        out = run(
            f"demo-seed{seed}", f"python recipes/grpo_forking.py --seed {seed} --output_dir {WORK}/demo-seed{seed}"
        )
        demo = _demo_figures(out)
        found[f"demo.seed{seed}"] = f"{percent(demo['before'])} to {percent(demo['after'])} ({signed(demo['change'])})"
    return found


def job_base_seeds(values: dict) -> dict:
    found = {}
    for seed in (1, 2):
        base = base_dir(seed)
        pass1, pass8, _ = _eval_figures(
            run(f"base{seed}-eval", f"python recipes/eval_aime.py --model_name_or_path {base} {EVAL_T1} "
                f"--output_dir {WORK}/eval-base{seed}")
        )  # fmt: skip
        out = run(
            f"demo-base{seed}",
            f"python recipes/grpo_forking.py --model_name_or_path {base} --output_dir {WORK}/demo-base{seed}",
        )
        demo = _demo_figures(out)
        found[f"base{seed}.sha"] = _build_record(base)["sha256"]["model.safetensors"][:12]
        found[f"base{seed}.pass"] = f"{percent(pass1)} / {percent(pass8)}"
        found[f"demo.base{seed}"] = f"{percent(demo['before'])} to {percent(demo['after'])} ({signed(demo['change'])})"
    return found


def job_zero_advantage(values: dict) -> dict:
    """The demo with TRL's population (zero-advantage completions compete for the top 20%), seeds 0-2."""
    found = {}
    for seed in (0, 1, 2):
        out = run(
            f"demo-trl-population-seed{seed}",
            f"python recipes/grpo_forking.py --seed {seed} --forking_ignore_zero_advantage false "
            f"--output_dir {WORK}/demo-trl-population-seed{seed}",
        )
        found[f"zero_adv.trl_population.seed{seed}"] = signed(_demo_figures(out)["change"])
    return found


def job_staleness(values: dict) -> dict:
    """The demo with 4 optimizer steps per rollout: how stale the precomputed masks are, and refreshing them."""
    found = {}
    for refresh in ("false", "true"):
        out_dir = f"{WORK}/demo-spg4-refresh-{refresh}"
        out, seconds = timed(
            f"demo-spg4-refresh-{refresh}",
            f"python recipes/grpo_forking.py --steps_per_generation 4 --per_device_train_batch_size 16 "
            f"--logging_steps 1 --forking_refresh_entropies {refresh} --output_dir {out_dir}",
        )
        with open(os.path.join(out_dir, "trainer_state.json")) as f:
            history = json.load(f)["log_history"]
        overlaps = [e["forking/mask_overlap_current"] for e in history if e.get("forking/mask_overlap_current")]
        found[f"staleness.{refresh}.change"] = signed(_demo_figures(out)["change"])
        found[f"staleness.{refresh}.seconds"] = f"{seconds:.0f} s"
        if overlaps:
            found[f"staleness.{refresh}.overlap"] = (
                f"{percent(statistics.fmean(overlaps))} (min {percent(min(overlaps))})"
            )
    return found


def job_trained(values: dict) -> dict:
    pass1, pass8, _ = _eval_figures(
        run("trained-eval", f"python recipes/eval_aime.py --model_name_or_path outputs/forking-demo {EVAL_T1} "
            f"--output_dir {WORK}/eval-trained")
    )  # fmt: skip
    return {"trained.pass1": percent(pass1), "trained.pass8": percent(pass8)}


def _analyze(job: str, model: str, out_dir: str, images: dict[str, str]) -> dict:
    """Runs ``trl-forking analyze`` on ``model``; copies its PNGs ``images`` ({written: docs/images name}); returns
    the report's summary, the printed output as a block and the share of digits among the forking tokens."""
    out = run(job, f"trl-forking analyze --model {model} {ANALYZE} -o {out_dir}")
    with open(os.path.join(out_dir, "report.json")) as f:
        report = json.load(f)
    for written, name in images.items():
        shutil.copy(os.path.join(out_dir, written), os.path.join(IMAGES, name))
    summary, table = report["summary"], report["forking_tokens"]
    digits = sum(row["count"] for row in table if row["token"].strip().isdigit())
    return {
        "summary": summary,
        "block": block(out.replace(ROOT + "/", "").replace(CACHE, "~/.cache")),
        "digit_share": digits / max(1, summary["num_selected"]),
    }


def job_analysis(values: dict) -> dict:
    base = base_dir()
    found = {}
    images = {
        "base": {"entropy_histogram.png": "analyze_entropy_histogram.png",
                 "forking_tokens.png": "analyze_forking_tokens.png"},
        "trained": {"entropy_histogram.png": "analyze_trained_entropy_histogram.png"},
    }  # fmt: skip
    for name, model in (("base", base), ("trained", "outputs/forking-demo")):
        result = _analyze(f"analyze-{name}", model, f"outputs/analysis/{name}", images[name])
        summary = result["summary"]
        found[f"analyze.{name}.block"] = result["block"]
        found[f"analyze.{name}.below"] = percent(summary["share_below"]["0.01"])
        for p in ("p50", "p80", "p90", "p95", "p99"):
            found[f"analyze.{name}.{p}"] = f"{summary['percentiles'][p]:.3g}"
        found[f"analyze.{name}.tokens"] = f"{summary['num_tokens']:,}"
        found[f"analyze.{name}.digit_share"] = percent(result["digit_share"])
    render = run(
        "render",
        f"trl-forking render --model {base} --completions outputs/analysis/base/completions.jsonl --index 0 1 2 3 "
        "-o outputs/analysis/render",
    )
    shutil.copy("outputs/analysis/render/forking_tokens_render.png", os.path.join(IMAGES, "render_forking_tokens.png"))
    overlap = run(
        "overlap",
        f"trl-forking overlap --model-a {base} --model-b outputs/forking-demo "
        "--completions outputs/analysis/base/completions.jsonl -o outputs/analysis/overlap",
    )
    shutil.copy(
        "outputs/analysis/overlap/entropy_change_by_bucket.png",
        os.path.join(IMAGES, "overlap_entropy_change_by_bucket.png"),
    )
    with open("outputs/analysis/overlap/overlap.json") as f:
        report = json.load(f)
    buckets = report["entropy_change_by_bucket"]
    found.update(
        {
            "render.block": block(render.replace(ROOT + "/", "")),
            "overlap.block": block(overlap.replace(ROOT + "/", "").replace(CACHE, "~/.cache")),
            "overlap.pooled": percent(report["overlap"]),
            "overlap.spearman": f"{report['spearman']:.2f}",
            "overlap.top_two": f"{-buckets[-2]['mean_change']:.2f} and {-buckets[-1]['mean_change']:.2f}",
            "overlap.rest": f"{max(abs(b['mean_change']) for b in buckets[:-2] if b['mean_change'] is not None):.3f}",
        }
    )
    return found


def job_ablation(values: dict) -> dict:
    out_dir = f"{WORK}/ablation"
    shutil.rmtree(out_dir, ignore_errors=True)
    out, seconds = timed("ablation", f"python recipes/ablation.py --output_dir {out_dir}")
    for name in ("accuracy_curves", "entropy_percentiles"):
        shutil.copy(os.path.join(out_dir, f"{name}.png"), os.path.join(IMAGES, f"ablation_{name}.png"))
    with open(os.path.join(out_dir, "compare.md")) as f:
        table = f.read()
    # The same table again from the run directories alone: what trl-forking compare gives from finished runs.
    run("ablation-compare", f"trl-forking compare {out_dir}/runs -o {out_dir}/again")
    with open(os.path.join(out_dir, "again", "compare.md")) as f:
        same = f.read() == table
    return {
        "ablation.table": "\n" + table.strip() + "\n",
        "ablation.minutes": f"{seconds / 60:.0f} minutes",
        "ablation.reproduced": "byte for byte" if same else "NOT byte for byte",
    }


def job_ablation_trl_population(values: dict) -> dict:
    """The ablation's top-20% arm with TRL's population, for the comparison with the default."""
    out_dir = f"{WORK}/ablation-trl-population"
    shutil.rmtree(out_dir, ignore_errors=True)
    run(
        "ablation-trl-population",
        f"python recipes/ablation.py --arms top:0.2 --forking_ignore_zero_advantage false --output_dir {out_dir}",
    )
    with open(os.path.join(out_dir, "compare.md")) as f:
        return {"ablation.trl_population.table": "\n" + f.read().strip() + "\n"}


def _arm_key(row: dict) -> str:
    """Returns the values' name of an arm of compare.json: ``all``, ``top20``, ``bottom20``, ``random20``, ..."""
    return row["selection"] if row["selection"] == "all" else f"{row['selection']}{round(100 * row['rho'])}"


def _difference(diff: dict) -> str:
    if diff["ci"] is None:
        return f"{100 * diff['mean']:+.1f} [no interval]"
    low, high = diff["ci"]
    return f"{100 * diff['mean']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def job_ablation_reading(values: dict) -> dict:
    """The numbers the reading of docs/ablation.md quotes, from the two studies' compare.json and results.json."""
    found = {}
    studies = (("ablation", f"{WORK}/ablation"), ("ablation.trl_population", f"{WORK}/ablation-trl-population"))
    for prefix, out_dir in studies:
        with open(os.path.join(out_dir, "compare.json")) as f:
            summary = json.load(f)
        for row in summary["arms"]:
            key = f"{prefix}.{_arm_key(row)}"
            final = row["final"]
            found[f"{key}.final"] = percent(final["mean"])
            by_seed = final["by_seed"].values()
            found[f"{key}.range"] = f"{percent(min(by_seed))}-{percent(max(by_seed))}"
            for name in ("final_vs_all", "auc_vs_all"):
                if row.get(name) and row[name]["mean"] is not None:
                    found[f"{key}.{name}"] = _difference(row[name])
        with open(os.path.join(out_dir, "results.json")) as f:
            results = json.load(f)
        start = [record for record in results if record["step"] == 0]
        found[f"{prefix}.start"] = percent(start[0]["accuracy"])
    return found


def job_cause(values: dict) -> dict:
    """The experiment of docs/task.md: the same recipe built with other CPU kernels gives other weights; the old
    recipe's quality hinged on them, the new one's does not."""
    old = "--num-heads 2 --num-kv-heads 2 --sft-steps 800 --num-threads 1"  # the recipe before issue 15
    rows = []
    for recipe_name, flags in (("old", old), ("new", "")):
        for index, (kernels, env) in enumerate(KERNELS):
            tag = f"cause-{recipe_name}-{index}"
            cache = f"{WORK}/cause-cache-{index}"  # a cache per kernel setting: each build is its own
            shutil.rmtree(cache, ignore_errors=True)
            path = run(
                tag,
                f"python -m trl_forking.scripts.base_model --no-progress --cache-dir {cache} {flags}",
                **env,
            )
            path = path.split()[-1]
            pass1, pass8, _ = _eval_figures(
                run(f"{tag}-eval", f"python recipes/eval_aime.py --model_name_or_path {path} {EVAL_T1} "
                    f"--output_dir {WORK}/{tag}", **env)
            )  # fmt: skip
            greedy = run(
                f"{tag}-greedy",
                f"python recipes/eval_aime.py --model_name_or_path {path} --datasets arithmetic-chains --num_samples 1 "
                f"--k 1 --temperature 0.05 --max_new_tokens 48 --backend transformers --output_dir {WORK}/{tag}-g",
                **env,
            )
            record = _build_record(path)
            low = float(re.search(r"avg@1 = ([\d.]+)%", greedy)[1]) / 100
            rows.append(
                f"| {recipe_name} | {kernels} | `{record['sha256']['model.safetensors'][:12]}` | "
                f"{record['sft_log'][-1]['loss']:.4f} | {percent(pass1)} | {percent(pass8)} | {percent(low)} |"
            )
    header = "| recipe | CPU kernels | weights sha256 | final SFT loss | pass@1 | pass@8 | T = 0.05 |"
    return {"cause.table": "\n".join(["", header, "|---|---|---|---:|---:|---:|---:|", *rows, ""])}


JOBS = {
    "base": job_base,
    "base_eval": job_base_eval,
    "demo": job_demo,
    "demo_seeds": job_demo_seeds,
    "base_seeds": job_base_seeds,
    "zero_advantage": job_zero_advantage,
    "staleness": job_staleness,
    "trained": job_trained,
    "analysis": job_analysis,
    "ablation": job_ablation,
    "ablation_trl_population": job_ablation_trl_population,
    "ablation_reading": job_ablation_reading,
    "cause": job_cause,
}


def rewrite_pages(values: dict) -> list[str]:
    """Rewrites every marked region of ``PAGES`` with its value; returns the names no value exists for."""
    missing = []

    def fill(match):
        name = match[1]
        if name not in values:
            missing.append(name)
            return match[0]
        return f"<!--fig:{name}-->{values[name]}<!--/fig-->"

    for page in PAGES:
        path = os.path.join(ROOT, page)
        with open(path) as f:
            text = f.read()
        new = MARKER.sub(fill, text)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(JOBS), help="run these jobs only (default: all)")
    parser.add_argument("--pages", action="store_true", help="only rewrite the pages from values.json")
    args = parser.parse_args(argv)
    os.makedirs(IMAGES, exist_ok=True)
    os.makedirs(WORK, exist_ok=True)
    values = {}
    if os.path.exists(VALUES):
        with open(VALUES) as f:
            values = json.load(f)
    if not args.pages:
        started = time.perf_counter()
        for name in args.only or JOBS:
            values.update(JOBS[name](values))
            with open(VALUES, "w") as f:  # after every job: an interrupted run keeps what it measured
                json.dump(values, f, indent=1, sort_keys=True)
        print(f"jobs done in {(time.perf_counter() - started) / 60:.0f} minutes: {' '.join(args.only or JOBS)}")
    missing = rewrite_pages(values)
    if missing:
        print(f"no value for: {', '.join(sorted(set(missing)))}", file=sys.stderr)
        return 1
    print(f"rewrote {', '.join(PAGES)} from {os.path.relpath(VALUES, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
