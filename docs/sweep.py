"""The tuning sweep of docs/tuning.md: GRPO and SFT variants on toy AST, each selected on dev.

    python docs/sweep.py                  # runs what is missing (2 at a time), then prints the table
    python docs/sweep.py --print          # only the table of the finished runs
    python docs/sweep.py --seeds 0 1 2 --only grpo-default sft-default

Every run is `python grpo_speech.py --task ast <its options> --seed S --threads 1
--skip_base_eval --eval_every 50 --dev_limit 100` into runs/sweep/<name>-seed<S> (its output
in <name>-seed<S>.log); a run whose results.json exists is not run again, so the sweep can be
stopped and continued in another session. The table shows the dev-best step and dev BLEU
(greedy), test BLEU sampled / greedy of the last and of the dev-best model, and the last
step's answer length (tokens), KL and entropy.
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
    print(f"{'run':<22} {'dev best':>12} {'last: sampled / greedy':>23} {'best: sampled / greedy':>23} "
          f"{'tokens':>6} {'kl':>6} {'entropy':>7}")
    for name in names:
        for seed in seeds:
            out = FOLDER / f"{name}-seed{seed}"
            if not (out / "results.json").is_file():
                continue
            results = json.loads((out / "results.json").read_text())
            last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
            after, best = results["after"], results.get("best", results["after"])
            dev = f"{best.get('dev_bleu', float('nan')):.2f} @{best.get('step', '-')}"
            print(f"{name + f' s{seed}':<22} {dev:>12} {after['sampled']['bleu']:>11.2f} / {after['greedy']['bleu']:<9.2f}"
                  f"{best['sampled']['bleu']:>13.2f} / {best['greedy']['bleu']:<9.2f}"
                  f"{last['completion_tokens']:>6.2f} {last.get('kl', float('nan')):>6.3f} "
                  f"{last.get('entropy', float('nan')):>7.3f}")


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
