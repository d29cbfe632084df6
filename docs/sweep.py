"""The tuning sweep of docs/tuning.md: GRPO and SFT variants on toy AST, each selected on dev.

    python docs/sweep.py                  # runs what is missing (2 at a time), then prints the table
    python docs/sweep.py --print          # only the table of the finished runs
    python docs/sweep.py --seeds 0 1 2 --only grpo-default sft-default

Every run is `python grpo_speech.py --task ast <its options> --seed S --threads 1
--skip_base_eval --eval_every 50 --dev_limit 100` into runs/sweep/<name>-seed<S> (its output
in <name>-seed<S>.log); a run whose results.json exists is not run again, so the sweep can be
stopped and continued in another session. The table shows the dev-best step and dev BLEU
(greedy), test BLEU sampled / greedy of the last and of the dev-best model, and the last
25 steps' mean answer length in tokens (SFT: the reference answers'), the policy's entropy
over the sampled tokens (first 25 steps > last 25) and the KL to the base (last 25).
"""
import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "runs" / "sweep"
COMMON = ["--task", "ast", "--threads", "1", "--skip_base_eval", "--eval_every", "50", "--dev_limit", "100"]
# The same budget of six configurations for each side (learning rate, batch and the side's own
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
    "grpo-batch8": ["--batch_size", "8", "--steps", "200"],
    "sft-batch64": ["--algo", "sft", "--sft_batch_size", "64", "--steps", "200"],
    "grpo-lr1e-4": ["--lr", "1e-4"],
    "sft-lr1e-4": ["--algo", "sft", "--lr", "1e-4"],
}


def run(name: str, seed: int) -> None:
    out = FOLDER / f"{name}-seed{seed}"
    if (out / "results.json").is_file():
        return
    FOLDER.mkdir(parents=True, exist_ok=True)
    with open(FOLDER / f"{name}-seed{seed}.log", "w") as log:
        subprocess.run([sys.executable, str(ROOT / "grpo_speech.py"), *COMMON, *RUNS[name], "--seed", str(seed),
                        "--output_dir", str(out), "--overwrite_output_dir"], stdout=log, stderr=subprocess.STDOUT)


def table(names: list[str], seeds: list[int]) -> None:
    print(f"{'run':<20} {'dev best':>11} {'last: sampled / greedy':>23} {'best: sampled / greedy':>23} "
          f"{'tokens':>12} {'entropy':>12} {'kl':>6}")
    for name in names:
        for seed in seeds:
            out = FOLDER / f"{name}-seed{seed}"
            if not (out / "results.json").is_file():
                continue
            results = json.loads((out / "results.json").read_text())
            steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

            def mean(key, part):            # over the first or the last 25 steps (one batch is noisy)
                rows = steps[:25] if part == "first" else steps[-25:]
                return sum(r.get(key, float("nan")) for r in rows) / len(rows)
            after, best = results["after"], results.get("best", results["after"])
            dev = f"{best.get('dev_bleu', float('nan')):.2f} @{best.get('step', '-')}"
            print(f"{name + f' s{seed}':<20} {dev:>11} {after['sampled']['bleu']:>11.2f} / {after['greedy']['bleu']:<9.2f}"
                  f"{best['sampled']['bleu']:>13.2f} / {best['greedy']['bleu']:<9.2f}"
                  f"{mean('completion_tokens', 'first'):>5.2f} > {mean('completion_tokens', 'last'):<6.2f}"
                  f"{mean('entropy', 'first'):>5.3f} > {mean('entropy', 'last'):<5.3f} {mean('kl', 'last'):>6.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=list(RUNS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--print", action="store_true", help="only print the finished runs' table")
    args = parser.parse_args()
    if not args.print:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: run(*job), [(n, s) for s in args.seeds for n in args.only]))
    table(args.only, args.seeds)
