"""The short seeded runs that a restructure of grpo_speech.py must reproduce to the last digit.

    python docs/seeded_runs.py runs/seeded        # runs what is missing there, then prints

Four runs of 12 steps on one thread (AST with grpo, mp_grpo and sft; SQA with grpo), each in
<folder>/<task>-<algo>; a run whose results.json exists is not run again. It prints every
run's test BLEU (base and after, sampled and greedy) and each step's loss and gradient norm
in full precision, so that the output before and after a change can be compared with diff.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = [("ast", "grpo"), ("ast", "mp_grpo"), ("ast", "sft"), ("sqa", "grpo")]
# G, the learning rate and SFT's batch as they were when the reference output was recorded
# (the defaults have moved since to the picks of docs/tuning.md).
COMMON = ["--steps", "12", "--eval_limit", "16", "--batch_size", "2", "--threads", "1",
          "--group_size", "8", "--lr", "5e-5", "--sft_batch_size", "16"]

folder = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "runs" / "seeded").resolve()
for task, algo in RUNS:
    out = folder / f"{task}-{algo}"
    if not (out / "results.json").is_file():       # the run's own output goes to <run>.log
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{task}-{algo}.log", "w") as log:
            subprocess.run([sys.executable, str(ROOT / "grpo_speech.py"), "--task", task, "--algo", algo,
                           *COMMON, "--output_dir", str(out), "--overwrite_output_dir"],
                           check=True, stdout=log, stderr=subprocess.STDOUT)
    results = json.loads((out / "results.json").read_text())
    bleu = " ".join(f"{when}_{mode} {results[when][mode]['bleu']!r}" for when in ("before", "after")
                    for mode in ("sampled", "greedy"))
    print(f"{task} {algo}: BLEU {bleu}")
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        print(f"  step {m['step']:>2} loss {m['loss']!r} grad_norm {m['grad_norm']!r}"
              + (f" reward {m['reward']!r}" if "reward" in m else ""))
