"""How often does a group hold a good answer? GRPO can only reinforce what its samples contain.

    python docs/group_best.py runs/sweep/ast/grpo-g12-seed0 [--steps 50]

From a GRPO run's completions.jsonl (every group of every step), over the first --steps
steps: the share of groups whose best answer reaches a reward (sentence BLEU, 0-1) of 0.3,
0.5 and 0.7, counting only the first k answers of each group for k = 4, 8, ... up to G. The
answers of a group are independent samples, so the first k of a run with G = 12 are a group
of k from the same policy.
"""
import argparse
import json
from pathlib import Path

THRESHOLDS = (0.3, 0.5, 0.7)

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    with open(Path(args.run) / "completions.jsonl", encoding="utf-8") as f:
        groups = [row["rewards"] for row in map(json.loads, f) if row["step"] <= args.steps]
    group_size = len(groups[0])
    print(f"{len(groups)} groups of the first {args.steps} steps; share whose best answer reaches")
    print(f"{'answers':>8}" + "".join(f"{f'>= {t}':>9}" for t in THRESHOLDS))
    for k in sorted({*range(4, group_size + 1, 4), group_size}):
        shares = [sum(max(rewards[:k]) >= t for rewards in groups) / len(groups) for t in THRESHOLDS]
        print(f"{k:>8}" + "".join(f"{share:>9.3f}" for share in shares))
