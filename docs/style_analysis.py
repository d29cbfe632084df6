"""The "words" and "other style" columns of docs/results.md, from runs' predictions.jsonl.

    python docs/style_analysis.py runs/ast-grpo-seed0 runs/sqa-grpo-seed0   # any run folders

For each run and each model in it (before / after training): the mean length in words of the
greedy answers; how many greedy answers are closer (sentence BLEU) to one of the line's other
correct renderings or wordings (the toy manifests' other_translations / other_answers, never
scored) than to its reference; and corpus BLEU, sampled and greedy, on the lines with and
without other renderings. docs/seeds.py uses greedy_style for its table.
"""
import json
import sys

import sacrebleu
from sacrebleu.metrics import BLEU

FIELDS = {"ast": ("translation", "other_translations"), "sqa": ("answer", "other_answers")}
sentence_bleu = BLEU(effective_order=True).sentence_score


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_lines(run):
    """The run's task, its test manifest's lines and its predictions, in manifest order."""
    with open(f"{run}/results.json", encoding="utf-8") as f:
        config = json.load(f)["config"]
    rows = read_jsonl(f"{run}/predictions.jsonl")
    return config["task"], read_jsonl(config["test"])[:len(rows)], rows   # --eval_limit: the first N


def greedy_style(run, when):
    """Mean words of the greedy answers of the model `when` ("before" / "after"), how many
    are in another rendering's style, and how many lines have other renderings."""
    task, lines, rows = run_lines(run)
    reference, others = FIELDS[task]
    answers = [row[f"{when}_greedy"] for row in rows]
    other_style = sum(any(sentence_bleu(a, [o]).score > sentence_bleu(a, [ex[reference][0]]).score
                          for o in ex[others]) for a, ex in zip(answers, lines))
    return {"words": sum(len(a.split()) for a in answers) / len(answers), "other_style": other_style,
            "lines_with_others": sum(bool(ex[others]) for ex in lines)}


if __name__ == "__main__":
    for run in sys.argv[1:]:
        task, lines, rows = run_lines(run)
        reference, others = FIELDS[task]
        for when in ("before", "after"):
            if f"{when}_greedy" not in rows[0]:
                continue
            style = greedy_style(run, when)
            print(f"{run} {when}: words {style['words']:.2f}, other style {style['other_style']} of "
                  f"{style['lines_with_others']}")
            for part, has_others in (("with other renderings", True), ("one rendering", False)):
                keep = [i for i, ex in enumerate(lines) if bool(ex[others]) == has_others]
                scores = [sacrebleu.corpus_bleu([rows[i][f"{when}_{mode}"] for i in keep],
                                                [[lines[i][reference][0] for i in keep]]).score
                          for mode in ("sampled", "greedy")]
                print(f"    {part}: {len(keep)} lines, BLEU sampled {scores[0]:.2f}, greedy {scores[1]:.2f}")
