"""The README's results table: the default GRPO, MP-GRPO and SFT runs of both tasks, seeds 0-2.

    python docs/seeds.py                 # runs what is missing (2 at a time), then prints the table
    python docs/seeds.py --print         # only the table of the finished runs

Every run is the default command with one thread, `python grpo_speech.py --task T --algo A
--seed S --threads 1` (SFT and MP-GRPO with --skip_base_eval: the base rows come from the GRPO
runs' evaluation before training), into runs/results/T-A-seedS (its output in T-A-seedS.log,
its wall time from start to summary in T-A-seedS.seconds). A run whose results.json exists is
not run again, so the runs can be stopped and continued in another session; seed 0 of every
row runs first. The table: test BLEU sampled / greedy and chrF sampled, mean +- std over the
finished seeds; the mean words of the greedy answers; how many greedy answers are in another
correct rendering's or wording's style (range over the seeds, docs/style_analysis.py); the
wall time per run.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from style_analysis import greedy_style  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS, ALGOS, SEEDS = ("ast", "sqa"), ("grpo", "mp_grpo", "sft"), (0, 1, 2)


def run_dir(task: str, algo: str, seed: int) -> Path:
    return ROOT / "runs" / "results" / f"{task}-{algo}-seed{seed}"


def run(task: str, algo: str, seed: int) -> None:
    out = run_dir(task, algo, seed)
    if (out / "results.json").is_file():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    skip = [] if algo == "grpo" else ["--skip_base_eval"]
    start = time.perf_counter()
    with open(out.with_name(out.name + ".log"), "w") as log:
        done = subprocess.run([sys.executable, str(ROOT / "grpo_speech.py"), "--task", task, "--algo", algo,
                               "--seed", str(seed), "--threads", "1", *skip, "--output_dir", str(out),
                               "--overwrite_output_dir"], stdout=log, stderr=subprocess.STDOUT)
    if done.returncode == 0:
        out.with_name(out.name + ".seconds").write_text(f"{time.perf_counter() - start:.0f}\n")


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 \
        else f"{values[0]:.2f}"


def table() -> None:
    print(f"{'task':<4} {'model':<8} {'seeds':>5} {'BLEU sampled':>14} {'BLEU greedy':>14} "
          f"{'chrF sampled':>14} {'words':>6} {'other style':>11} {'wall per run':>13}")
    for task in TASKS:
        for algo in ("base", *ALGOS):
            outs = [run_dir(task, "grpo" if algo == "base" else algo, seed) for seed in SEEDS]
            outs = [out for out in outs if (out / "results.json").is_file()]
            if not outs:
                continue
            when = "before" if algo == "base" else "after"
            scores = [json.loads((out / "results.json").read_text())[when] for out in outs]
            styles = [greedy_style(out, when) for out in outs]
            cells = [mean_std([s[mode][metric] for s in scores])
                     for mode, metric in (("sampled", "bleu"), ("greedy", "bleu"), ("sampled", "chrf"))]
            other = sorted({s["other_style"] for s in styles})
            seconds = [float(out.with_name(out.name + ".seconds").read_text()) / 60 for out in outs
                       if algo != "base" and out.with_name(out.name + ".seconds").is_file()]
            wall = f"{min(seconds):.1f}-{max(seconds):.1f} min" if seconds else ""
            print(f"{task:<4} {algo:<8} {len(outs):>5} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14} "
                  f"{statistics.mean(s['words'] for s in styles):>6.2f} "
                  f"{f'{other[0]}-{other[-1]}' if len(other) > 1 else other[0]:>11} {wall:>13}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--print", action="store_true", help="only print the finished runs' table")
    args = parser.parse_args()
    if not args.print:
        jobs = [(task, algo, seed) for seed in SEEDS for task in TASKS for algo in ALGOS]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: run(*job), jobs))
    table()
