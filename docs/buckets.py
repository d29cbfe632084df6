"""Per-line analysis: does training keep the answers the base model could already give?

    python docs/buckets.py runs/ast-grpo-seed0 runs/ast-sft-seed0 ...   # runs of one task

Each test line goes into a bucket by the base model's best sentence BLEU among 8 answers
sampled at temperature 1, as in training (0-20, 20-40, 40-70, 70-100): how well the base can
already answer it. Per bucket it prints the corpus BLEU of every model's test answers, sampled
and greedy, from the runs' predictions.jsonl (the base from the first run that has
before_*, each run from after_*), and their mean length in words. The base's 8 samples are
computed once per test manifest (seed 0) and kept in runs/best-of-8-<task>-<lines>.json.
"""
import json
import sys
from pathlib import Path

import sacrebleu
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo_speech as gs  # noqa: E402

BUCKETS = [(0, 20), (20, 40), (40, 70), (70, 100.01)]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def base_best_of_8(config: dict, examples: list[dict]) -> list[float]:
    """The base model's best sentence BLEU (0-100) among 8 samples per line, cached."""
    cache = gs.ROOT / "runs" / f"best-of-8-{config['task']}-{len(examples)}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    cfg = gs.Config(**{**config, "model": str(gs.DATA_DIR / "granite-speech-tiny"), "lora_rank": 0})
    processor, model = gs.load_model(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    best = []
    with torch.no_grad():
        for start in range(0, len(examples), 25):
            chunk = examples[start:start + 25]
            batch = gs.make_batch(chunk, processor, torch.device("cpu"))
            ids = gs.sample(model, batch, gs.encode_audio(model, batch), 8, cfg.max_completion_length, 1.0)
            answers = gs.decode(processor.tokenizer, ids, gs.completion_mask(ids, model.config.text_config.eos_token_id))
            rewards = gs.REWARDS["bleu"](answers, [r for r in batch.references for _ in range(8)])
            best += (100 * rewards.view(-1, 8).max(dim=1).values).tolist()
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(json.dumps(best))
    return best


def main(runs: list[str]) -> None:
    results = [json.loads((Path(run) / "results.json").read_text()) for run in runs]
    config = results[0]["config"]
    rows = {run: read_jsonl(Path(run) / "predictions.jsonl") for run in runs}
    examples = gs.load_manifest(config["test"], config["task"])[:len(rows[runs[0]])]
    best = base_best_of_8(config, examples)
    models = [("base", rows[run], "before") for run in runs if "before_greedy" in rows[run][0]][:1]
    models += [(Path(run).name, rows[run], "after") for run in runs]
    references = [gs.references_of(ex)[0] for ex in examples]
    print(f"{config['task']}: {len(examples)} test lines; BLEU sampled / greedy (words) per bucket of "
          f"the base's best-of-8 sentence BLEU")
    print(f"{'model':<24}" + "".join(f"{f'{low:.0f}-{min(high, 100):.0f}':>22}" for low, high in BUCKETS))
    counts = [sum(low <= b < high for b in best) for low, high in BUCKETS]
    print(f"{'lines':<24}" + "".join(f"{n:>22}" for n in counts))
    for name, predictions, when in models:
        cells = []
        for low, high in BUCKETS:
            keep = [i for i, b in enumerate(best) if low <= b < high]
            if not keep:
                cells.append(f"{'-':>22}")
                continue
            scores = [sacrebleu.corpus_bleu([predictions[i][f"{when}_{mode}"] for i in keep],
                                            [[references[i] for i in keep]]).score for mode in ("sampled", "greedy")]
            words = sum(len(predictions[i][f"{when}_greedy"].split()) for i in keep) / len(keep)
            cells.append(f"{scores[0]:>7.1f} / {scores[1]:5.1f} ({words:.1f})")
        print(f"{name:<24}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main(sys.argv[1:])
