"""The tuning sweep of docs/tuning.md: GRPO and SFT variants, each selected on dev.

    python docs/sweep.py --task ast       # runs what is missing (2 at a time), then prints the table
    python docs/sweep.py --task ast --print                # only the table of the finished runs
    python docs/sweep.py --task sqa --seeds 0 1 2 --only grpo-default sft-default

Every run is `python grpo_speech.py --task T <its options> --seed S --threads 1
--skip_base_eval --eval_every 50 --dev_limit 100` into runs/sweep/T/<name>-seed<S> (its output
in <name>-seed<S>.log); a run whose results.json exists is not run again, so the sweep can be
stopped and continued in another session. The table shows the dev-best step and dev BLEU
(greedy), test BLEU sampled / greedy of the last and of the dev-best model, the mean answer
length in tokens (first 25 steps > last 25; SFT: the reference answers'), the policy's entropy
over the sampled tokens (first 25 > last 25), the KL to the base (last 25) and the mean words
of the last model's greedy test answers.
Configurations with two or more finished seeds get a second table: the mean +- std over the
seeds of the last model's test BLEU, and the mean words of its greedy answers.
"""
import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# G = 8 and lr 5e-5 for both sides were the defaults when the sweep ran (the defaults are now
# its picks: G = 12, SFT lr 2e-4): every run keeps them unless its own options say otherwise
# (the last option given counts).
COMMON = ["--threads", "1", "--skip_base_eval", "--eval_every", "50", "--dev_limit", "100",
          "--group_size", "8", "--lr", "5e-5"]
HALF_STEPS = {"ast": "200", "sqa": "100"}       # the batch-doubling runs: the same number of answers
# The same budget of configurations for each side (learning rate, batch and the side's own
# knobs); "equal-data" is SFT on as many distinct prompts per step as GRPO (4, one answer each).
RUNS = {                       # GRPO and SFT alternate, so that a cut-off sweep has both sides
    "grpo-default": [],
    "sft-default": ["--algo", "sft"],
    "grpo-lr2e-5": ["--lr", "2e-5"],
    "sft-lr2e-5": ["--algo", "sft", "--lr", "2e-5"],
    "grpo-dr": ["--scale_rewards", "none", "--loss_type", "dr_grpo"],
    "sft-equal-data": ["--algo", "sft", "--sft_batch_size", "4"],
    "grpo-beta0.1": ["--beta", "0.1"],
    "sft-lr1e-5": ["--algo", "sft", "--lr", "1e-5"],
    "grpo-batch8": ["--batch_size", "8", "--steps", "{half_steps}"],
    "sft-batch64": ["--algo", "sft", "--sft_batch_size", "64", "--steps", "{half_steps}"],
    "grpo-lr1e-4": ["--lr", "1e-4"],
    "sft-lr1e-4": ["--algo", "sft", "--lr", "1e-4"],
}
# A second round, after the first pointed at length and entropy: a larger group, Dr. GRPO
# with a larger beta; for SFT the next learning rate up, and 1e-4 with the larger batch. On
# SQA only the two picks of AST's second round ran (one more configuration for each side).
SECOND_ROUND = {
    "grpo-g12": ["--group_size", "12"],
    "sft-lr2e-4": ["--algo", "sft", "--lr", "2e-4"],
    "grpo-dr-beta0.1": ["--scale_rewards", "none", "--loss_type", "dr_grpo", "--beta", "0.1"],
    "sft-lr1e-4-batch64": ["--algo", "sft", "--lr", "1e-4", "--sft_batch_size", "64", "--steps", "{half_steps}"],
}
ALL_RUNS = {**RUNS, **SECOND_ROUND}
RUNS_OF_TASK = {"ast": list(ALL_RUNS), "sqa": [*RUNS, "grpo-g12", "sft-lr2e-4"]}


def run_dir(task: str, name: str, seed: int) -> Path:
    return ROOT / "runs" / "sweep" / task / f"{name}-seed{seed}"


def run(task: str, name: str, seed: int) -> None:
    out = run_dir(task, name, seed)
    if (out / "results.json").is_file():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    options = [option.format(half_steps=HALF_STEPS[task]) for option in ALL_RUNS[name]]
    with open(out.with_name(out.name + ".log"), "w") as log:
        subprocess.run([sys.executable, str(ROOT / "grpo_speech.py"), "--task", task, *COMMON, *options,
                        "--seed", str(seed), "--output_dir", str(out), "--overwrite_output_dir"],
                       stdout=log, stderr=subprocess.STDOUT)


def greedy_words(out: Path) -> float:
    """Mean words of the last model's greedy test answers."""
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return sum(len(row["after_greedy"].split()) for row in rows) / len(rows)


def table(task: str, names: list[str], seeds: list[int]) -> None:
    print(f"{'run':<22} {'dev best':>11} {'last: sampled / greedy':>23} {'best: sampled / greedy':>23} "
          f"{'tokens':>12} {'entropy':>12} {'kl':>6} {'words':>6}")
    for name in names:
        for seed in seeds:
            out = run_dir(task, name, seed)
            if not (out / "results.json").is_file():
                continue
            results = json.loads((out / "results.json").read_text())
            steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

            def mean(key, part):            # over the first or the last 25 steps (one batch is noisy)
                rows = steps[:25] if part == "first" else steps[-25:]
                return sum(r.get(key, float("nan")) for r in rows) / len(rows)
            after, best = results["after"], results.get("best", results["after"])
            dev = f"{best.get('dev_bleu', float('nan')):.2f} @{best.get('step', '-')}"
            print(f"{name + f' s{seed}':<22} {dev:>11} {after['sampled']['bleu']:>11.2f} / {after['greedy']['bleu']:<9.2f}"
                  f"{best['sampled']['bleu']:>13.2f} / {best['greedy']['bleu']:<9.2f}"
                  f"{mean('completion_tokens', 'first'):>5.2f} > {mean('completion_tokens', 'last'):<6.2f}"
                  f"{mean('entropy', 'first'):>5.3f} > {mean('entropy', 'last'):<5.3f} {mean('kl', 'last'):>6.3f} {greedy_words(out):>6.2f}")


def seed_means(task: str, names: list[str], seeds: list[int]) -> None:
    """Mean +- std over the finished seeds: test BLEU of the last model and its greedy words."""
    print(f"\n{'config':<22} {'seeds':>5} {'sampled':>15} {'greedy':>15} {'greedy words':>13}")
    for name in names:
        outs = [run_dir(task, name, seed) for seed in seeds]
        outs = [out for out in outs if (out / "results.json").is_file()]
        if len(outs) < 2:
            continue
        after = [json.loads((out / "results.json").read_text())["after"] for out in outs]
        cells = []
        for mode in ("sampled", "greedy"):
            scores = [a[mode]["bleu"] for a in after]
            cells.append(f"{statistics.mean(scores):.2f} ± {statistics.stdev(scores):.2f}")
        words = [greedy_words(out) for out in outs]
        print(f"{name:<22} {len(outs):>5} {cells[0]:>15} {cells[1]:>15} {statistics.mean(words):>13.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=list(HALF_STEPS), required=True)
    parser.add_argument("--only", nargs="*", choices=list(ALL_RUNS), help="configurations (default: all of the task's)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--print", action="store_true", help="only print the finished runs' table")
    args = parser.parse_args()
    args.only = args.only or RUNS_OF_TASK[args.task]
    if not args.print:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: run(args.task, *job), [(n, s) for s in args.seeds for n in args.only]))
    table(args.task, args.only, args.seeds)
    seed_means(args.task, args.only, args.seeds)
