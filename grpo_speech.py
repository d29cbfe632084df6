"""GRPO for a speech-aware language model, in one file.

A minimal implementation of "Advancing Speech Understanding in Speech-Aware Language Models with
GRPO" (Elmakies et al., arXiv 2509.16990). A speech-aware LLM (speech encoder -> projector ->
LLM; Granite Speech here, as in the paper) answers open-ended speech tasks. Instead of
supervised fine-tuning (SFT) it is trained with Group Relative Policy Optimization: sample a
group of G answers per prompt, score each with sentence BLEU against the reference, and push up
the answers that beat their group's average. MP-GRPO puts the reference itself into each group
as an off-policy sample.

    python grpo_speech.py --task ast                  # toy En->De speech translation, CPU
    python grpo_speech.py --task sqa --algo mp_grpo   # toy spoken QA with Mixed-Policy GRPO
    python grpo_speech.py --task ast --algo sft       # the SFT baseline, same data and budget
    python grpo_speech.py --help

The file has three parts:

    Part I    the paper: rewards, group advantages, token log-probs, the (MP-)GRPO loss and
              reference injection, as pure functions (each can be copied into a trainer alone)
    Part II   the speech LLM and the loop: options, data, Granite Speech, the rollout, one GRPO
              step, the SFT step, evaluation, the training loop
    Part III  plumbing, which a first reading may skip: input checks, checkpoints and resume,
              torchrun, LoRA, reporting, the command line

Shapes: P prompts, G answers per prompt, B = P * G rows (or any number of sequences), T
completion tokens, L prompt tokens, S audio tokens, H hidden size, V vocabulary.
"""
from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import functools
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"


# =============================================================================================
# Part I: the paper, as pure functions over tensors and strings
# =============================================================================================
# --- Rewards: text similarity to the reference(s), in [0, 1] --------------------------------
def bleu_rewards(completions: list[str], references: list[list[str]]) -> torch.Tensor:
    """r_i = sentence BLEU(completion_i, references_i) / 100, with sacrebleu's sentence_bleu
    settings (exponential smoothing, effective n-gram order). An empty completion scores 0.

    completions: B strings; references: B lists of one or more strings -> (B,) float tensor
    """
    from sacrebleu.metrics import BLEU
    bleu = BLEU(effective_order=True)
    return torch.tensor([bleu.sentence_score(c, refs).score / 100.0 if c.strip() else 0.0
                         for c, refs in zip(completions, references)])


def chrf_rewards(completions: list[str], references: list[list[str]]) -> torch.Tensor:
    """r_i = chrF(completion_i, references_i) / 100 (sacrebleu; character n-gram F-score)."""
    from sacrebleu.metrics import CHRF
    chrf = CHRF()                                   # one scorer for the whole batch
    return torch.tensor([chrf.sentence_score(c, refs).score / 100.0 if c.strip() else 0.0
                         for c, refs in zip(completions, references)])


def ter_rewards(completions: list[str], references: list[list[str]]) -> torch.Tensor:
    """r_i = max(0, 1 - TER_i / 100): TER counts edits per reference word (lower is better,
    can exceed 100), so it is flipped and floored to make a reward in [0, 1]."""
    from sacrebleu.metrics import TER
    ter = TER()
    return torch.tensor([max(0.0, 1.0 - ter.sentence_score(c, refs).score / 100.0)
                         if c.strip() else 0.0 for c, refs in zip(completions, references)])


REWARDS = {"bleu": bleu_rewards, "chrf": chrf_rewards, "ter": ter_rewards}   # + ROUGE, Part III


# --- Advantages: each answer against its own group ------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     stabilizer: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + stabilizer)

    rewards: (P * G,), grouped: rows p*G .. p*G + G-1 belong to prompt p -> advantages (P * G,)
    scale: "group" (the paper; TRL's default) divides by the group's std, "batch" by the std of
    all rewards in the batch, "none" only centres (Dr. GRPO: no difficulty re-weighting).
    std is the sample std (Bessel's correction, n - 1), as TRL computes it, so the numbers match
    what users see there. A group whose rewards are all equal carries no signal: its advantages
    are exactly 0 (0 / (0 + stabilizer)), never NaN.
    """
    if group_size < 2:
        raise ValueError("group_advantages needs group_size >= 2")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)                      # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)       # (P, G)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + stabilizer)
    elif scale == "batch":
        centred = centred / (rewards.std() + stabilizer)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}")
    return centred.reshape(-1)


# --- Token log-probs and the loss -----------------------------------------------------------
def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for every token up to and including the first EOS (the model must learn to stop),
    0 after it. A completion without EOS (cut at the length limit) keeps all its tokens.

    completion_ids: (B, T) -> mask (B, T) float
    """
    is_eos = completion_ids == eos_token_id
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1),
                            torch.full_like(is_eos[:, 0], completion_ids.shape[1], dtype=torch.long))
    return (positions[None, :] <= first_eos[:, None]).float()


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
    """log pi(o_t | q, o_<t) of the sampled tokens, per token.

    logits: (B, T, V) predicting tokens (B, T); mask (B, T) zeroes padding -> (B, T)
    Computed as log_softmax + gather (stable for any logit size). Logits are divided by the
    sampling temperature first, so the log-probs are those of the distribution that was sampled.
    """
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = log_probs.gather(dim=-1, index=tokens.unsqueeze(-1)).squeeze(-1)
    return picked if mask is None else torch.where(mask.bool(), picked, 0.0)


def loss_normalizer(loss_type: str, mask: torch.Tensor, max_completion_length: int | None = None) -> float:
    """N, the divisor of grpo_loss's token sum for rows `mask` (B, T): "dapo" (the paper) the
    number of completion tokens, "grpo" the number of sequences (each already divided by its
    length), "dr_grpo" B * max_completion_length (default T). It is a count, so it adds up: sum
    it over micro-batches and processes to get the whole batch's N."""
    if loss_type == "dapo":
        return max(mask.sum().item(), 1.0)
    if loss_type == "grpo":
        return float(mask.shape[0])
    if loss_type == "dr_grpo":
        return float(mask.shape[0] * (max_completion_length or mask.shape[1]))
    raise ValueError(f"unknown loss_type {loss_type!r}")


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, base_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, eps: float = 0.2, beta: float = 0.02,
              loss_type: str = "dapo", off_policy: torch.Tensor | None = None,
              eps_high: float | None = None, policy_shaping: float = 0.0,
              max_completion_length: int | None = None,
              normalizer: float | None = None) -> tuple[torch.Tensor, dict]:
    """The (MP-)GRPO objective of the paper, as a loss to minimise.

        s_it = pi_theta(o_it) / pi_old(o_it) = exp(logp - old_logp)
        l_it = min(s_it A_i, clip(s_it, 1 - eps, 1 + eps_high) A_i)             on-policy rows
        l_it = f(pi_theta(o_it)) A_i,  f(p) = p (or p / (p + gamma) if shaping)   off-policy rows
        KL_it = exp(base - logp) - (base - logp) - 1                      (k3 estimator, >= 0)
        loss  = -sum_it (l_it - beta KL_it) / N,       N = loss_normalizer(loss_type, mask)

    Off-policy rows (MP-GRPO) hold the ground-truth answer: their behaviour policy is taken as
    1, so the importance weight is pi_theta itself, unclipped (LUFFY). base_logp: log-probs
    under the frozen base model; None or beta = 0 drops the KL term. `normalizer` is the WHOLE
    batch's N: pass it when these rows are a part of the batch (a micro-batch, a process's
    share), so that the parts' losses add up to the batch's; None: these rows' own N.

    logp, old_logp, base_logp, mask: (B, T); advantages: (B,); off_policy: (B,) bool or None.
    Returns (loss, diagnostics): mean ratio and clip fraction over on-policy tokens, mean KL.
    With one update per batch old_logp = logp.detach(): s = 1, nothing is clipped, and the
    gradient is REINFORCE with a group baseline, -sum_it A_i grad logp_it / N.
    """
    eps_high = eps if eps_high is None else eps_high
    keep = mask.bool()
    mask = mask.float()
    # Padding may hold anything (even inf or NaN): zero it before exp, so that neither the loss
    # nor its gradient can see it (0 * inf would be NaN).
    logp = torch.where(keep, logp, 0.0)
    old_logp = torch.where(keep, old_logp, 0.0)
    base_logp = None if base_logp is None else torch.where(keep, base_logp, 0.0)
    A = advantages.unsqueeze(1)                                        # (B, 1)
    ratio = torch.exp(logp - old_logp)                                 # (B, T)
    clipped_ratio = torch.clamp(ratio, 1 - eps, 1 + eps_high)
    objective = torch.min(ratio * A, clipped_ratio * A)                # (B, T)
    if off_policy is not None and off_policy.any():
        probability = torch.exp(logp)
        weight = probability / (probability + policy_shaping) if policy_shaping > 0 else probability
        objective = torch.where(off_policy.unsqueeze(1), weight * A, objective)
    else:
        off_policy = torch.zeros(logp.shape[0], dtype=torch.bool, device=logp.device)
    kl = torch.zeros_like(logp)
    if beta > 0 and base_logp is not None:
        delta = base_logp - logp
        kl = torch.exp(delta) - delta - 1
        objective = objective - beta * kl
    per_token = -objective * mask                                      # padding contributes 0
    if loss_type == "grpo":                          # each sequence's tokens weigh 1 / its length
        per_token = per_token / mask.sum(dim=1, keepdim=True).clamp(min=1)
    if normalizer is None:
        normalizer = loss_normalizer(loss_type, mask, max_completion_length)
    loss = per_token.sum() / normalizer
    with torch.no_grad():
        on_mask = mask * (~off_policy).float().unsqueeze(1)
        is_clipped = ((ratio < 1 - eps) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
        on_tokens = on_mask.sum().clamp(min=1)
        diagnostics = {"ratio": ((ratio * on_mask).sum() / on_tokens).item(),
                       "clip_fraction": ((is_clipped.float() * on_mask).sum() / on_tokens).item(),
                       "kl": ((kl * mask).sum() / mask.sum().clamp(min=1)).item()}
    return loss, diagnostics


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
    """Cross-entropy of the reference tokens, averaged over tokens: -sum_it logp_it / N, with N
    the whole batch's token count (`normalizer`; None: these rows' own).

    logp, mask: (B, T) -> scalar"""
    return -(logp * mask).sum() / (mask.sum().clamp(min=1) if normalizer is None else normalizer)


# --- MP-GRPO: the ground truth as one member of each group ----------------------------------
def inject_reference(completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                     reference_ids: list[torch.Tensor], group_size: int,
                     pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace the last completion of every group with the reference answer (off-policy).

    completion_ids, completion_mask: (P * G, T); reference_ids: P token tensors, each ending in
    EOS -> (ids (P * G, T'), mask (P * G, T'), off_policy (P * G,) bool), T' = max(T, longest
    reference). Row p*G + G-1 holds reference p; its mask covers the reference tokens.

    Advantages are then computed over the mixed group. The reference scores the maximum reward
    (BLEU 100 against itself), so it raises the group mean and lowers the advantages of the G-1
    sampled answers: a sample now needs to beat a mean that includes the perfect answer.
    """
    num_rows, length = completion_ids.shape
    length = max([length] + [len(r) for r in reference_ids])
    ids = torch.full((num_rows, length), pad_token_id, dtype=completion_ids.dtype,
                     device=completion_ids.device)
    mask = torch.zeros((num_rows, length), dtype=completion_mask.dtype, device=completion_mask.device)
    ids[:, :completion_ids.shape[1]] = completion_ids
    mask[:, :completion_mask.shape[1]] = completion_mask
    off_policy = torch.zeros(num_rows, dtype=torch.bool, device=completion_ids.device)
    for prompt, reference in enumerate(reference_ids):
        row = prompt * group_size + group_size - 1
        ids[row] = pad_token_id
        mask[row] = 0
        ids[row, :len(reference)] = reference.to(ids.device)
        mask[row, :len(reference)] = 1
        off_policy[row] = True
    return ids, mask, off_policy


# =============================================================================================
# Part II: the speech LLM and the training loop
# =============================================================================================
# --- Options ---------------------------------------------------------------------------------
def option(default, help: str, choices: tuple = (), minimum: float | None = None, need: str = ""):
    """A config field: its help text becomes the --help line of its flag; `choices`, `minimum`
    and `need` (a condition on the value, e.g. "0 < eps < 1") are checked by check_config."""
    return field(default=default, metadata=dict(help=help, choices=choices, minimum=minimum,
                                                need=need))


@dataclass
class Config:
    """Every option of a run; `python grpo_speech.py --help` lists them with these texts."""
    # --- what to train ---
    task: str = option("ast", "ast (speech translation En->De), sqa (spoken QA) or asr "
                       "(transcription of the AST clips, scored by WER too)", choices=("ast", "sqa", "asr"))
    algo: str = option("grpo", "grpo, mp_grpo (the reference injected into each group) or sft "
                       "(the supervised baseline)", choices=("grpo", "mp_grpo", "sft"))
    model: str = option(str(DATA_DIR / "granite-speech-tiny"),
                        "checkpoint directory or hub id (e.g. ibm-granite/granite-speech-3.3-2b)")
    train: str = option("", "training manifest (JSONL); default data/<task>/train.jsonl")
    test: str = option("", "evaluation manifest (JSONL); default data/<task>/test.jsonl")
    output_dir: str = option("", "metrics, checkpoints and the final model; default "
                             "runs/<task>-<algo>-seed<seed>")
    reward: str = option("bleu", "reward metric (paper: bleu)", choices=REWARDS)
    # --- GRPO (paper section 3) ---
    group_size: int = option(12, "G, completions sampled per prompt (paper: 8; 12 is the pick of "
                             "docs/tuning.md)")
    beta: float = option(0.02, "weight of the KL penalty to the base model (paper: 0.02)", minimum=0)
    eps: float = option(0.2, "PPO clip range: ratios outside [1-eps, 1+eps] get no gradient",
                        need="0 < eps < 1")
    eps_high: float = option(-1.0, "upper clip range if not eps (DAPO's clip-higher); -1 = eps",
                             need="eps_high == -1 or 0 < eps_high < 10")
    loss_type: str = option("dapo", "token aggregation: dapo (paper), grpo (per-sequence mean) or "
                            "dr_grpo", choices=("dapo", "grpo", "dr_grpo"))
    scale_rewards: str = option("group", "advantage scaling: group std (paper), batch std, none "
                                "(Dr. GRPO)", choices=("group", "batch", "none"))
    num_iterations: int = option(1, "policy updates per sampled batch (mu); 1: the ratio is 1",
                                 minimum=1)
    # Below temperature 0.1 a group's answers are all the same: no advantage, no training.
    temperature: float = option(1.0, "sampling temperature in training (paper: 1.0)",
                                need="0.1 <= temperature <= 10")
    max_completion_length: int = option(48, "most tokens per answer (paper: 200; toy answers are "
                                        "short)", minimum=1)
    policy_shaping: float = option(0.0, "MP-GRPO: LUFFY's f(p) = p / (p + gamma) on off-policy "
                                   "tokens; 0 = off (paper)", minimum=0)
    # --- optimisation ---
    steps: int = option(-1, "optimizer steps; -1 = the task's default (ast 400, sqa and asr 200); "
                        "0 = only evaluate --model on --test")
    batch_size: int = option(4, "prompts per step (each sampled G times)", minimum=1)
    sft_batch_size: int = option(32, "SFT reference answers per step (GRPO's 4 x 8 answers when "
                                 "the two were tuned)", minimum=1)
    lr: float = option(-1.0, "AdamW learning rate; -1 = the algorithm's default (grpo, mp_grpo "
                       "5e-5; sft 2e-4: the picks of docs/tuning.md)", need="lr == -1 or lr >= 0")
    weight_decay: float = option(0.0, "AdamW weight decay", minimum=0)
    warmup_ratio: float = option(0.05, "share of steps with linear warm-up",
                                 need="0 <= warmup_ratio <= 1")
    lr_scheduler: str = option("constant_with_warmup", "a transformers scheduler name")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 = no clipping", minimum=0)
    micro_batch_size: int = option(0, "sequences per forward/backward pass (memory; the update "
                                   "is the same); 0 = all at once", minimum=0)
    gradient_checkpointing: bool = option(False, "recompute the LLM's activations in backward")
    lora_rank: int = option(0, "0: train the whole LLM (paper); r > 0: a new LoRA of rank r on "
                            "its linear layers (the base model is the LoRA switched off)", minimum=0)
    train_projector: bool = option(False, "SFT only: train the projector too (the speech "
                                   "encoder is always frozen)")
    # --- evaluation (paper: sampling with top-p 0.9, temperature 0.9) ---
    eval_temperature: float = option(0.9, "sampling temperature in evaluation",
                                     need="0.1 <= eval_temperature <= 10")
    eval_top_p: float = option(0.9, "nucleus top-p in evaluation", need="0 < eval_top_p <= 1")
    eval_batch_size: int = option(50, "clips per evaluation batch", minimum=1)
    eval_limit: int = option(0, "evaluate on the first N test clips only; 0 = all", minimum=0)
    skip_base_eval: bool = option(False, "do not evaluate the model before training")
    eval_every: int = option(0, "score --dev (greedy BLEU) every N steps and keep the best model "
                             "in best/; 0 = off", minimum=0)
    dev: str = option("", "validation manifest for --eval_every; default data/<task>/dev.jsonl")
    dev_limit: int = option(100, "first N dev clips only; 0 = all", minimum=0)
    eval_audio: str = option("speech", "what the model hears in evaluation: speech, or silence / "
                             "shuffled (another clip), to check that it listens",
                             choices=("speech", "silence", "shuffled"))
    # --- running ---
    seed: int = option(0, "seed for data order, sampling and initialisation")
    device: str = option("auto", "cpu, cuda or auto", choices=("auto", "cpu", "cuda"))
    dtype: str = option("float32", "weights and compute (TF32 matmuls on GPUs)",
                        choices=("float32", "bfloat16"))
    save_dtype: str = option("auto", "dtype of the saved final model (auto: as trained)",
                             choices=("auto", "float32", "bfloat16"))
    threads: int = option(0, "torch CPU threads; 0 = all cores", minimum=0)
    log_every: int = option(10, "print the metrics and one group every N steps", minimum=0)
    save_every: int = option(0, "write a resumable checkpoint every N steps; 0 = only final/",
                             minimum=0)
    keep_checkpoints: int = option(2, "how many step checkpoints to keep", minimum=1)
    resume: str = option("", "continue from a checkpoint directory, or 'last' in output_dir; "
                         "its options apply unless given again")
    overwrite_output_dir: bool = option(False, "start afresh in an output_dir that holds another "
                                        "run's files (they are deleted)")
    examples: int = option(3, "example predictions to print after evaluation", minimum=0)
    trust_remote_code: bool = option(False, "allow a checkpoint's own Python code")


# Each algorithm's learning rate, picked on dev BLEU with the same budget of configurations
# for both sides (docs/tuning.md): SFT learns from references and takes a 4x larger step.
DEFAULT_LR = {"grpo": 5e-5, "mp_grpo": 5e-5, "sft": 2e-4}


# --- Data: manifests, audio, prompts ---------------------------------------------------------
# A manifest is JSONL, one example per line (data/README.md): "audio" (path relative to the
# manifest), the task's text fields, and optionally "task" to mix tasks in one file (used for the
# toy base model's pretraining mix). load_manifest and load_audio (Part III) read and check
# them. The prompts are the paper's.
TASKS = {
    "ast": {"prompt": "<|audio|> listen to the speech and translate it into German.",
            "fields": ("translation",), "references": lambda ex: ex["translation"], "steps": 400},
    "sqa": {"prompt": "Listen to the audio <|audio|> and answer the following question: {question}",
            "fields": ("question", "answer"), "references": lambda ex: ex["answer"], "steps": 200},
    "asr": {"prompt": "<|audio|>can you transcribe the speech into a written format?",
            "fields": ("text",), "references": lambda ex: [ex["text"]], "steps": 200},
}
SAMPLING_RATE = 16_000


def prompt_text(example: dict, tokenizer) -> str:
    """The user turn in the checkpoint's own chat format, ready for the assistant's answer."""
    content = TASKS[example["task"]]["prompt"].format(question=example.get("question", ""))
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def references_of(example: dict) -> list[str]:
    return TASKS[example["task"]]["references"](example)


@dataclass
class Batch:
    """P prompts: left-padded prompt tokens with <|audio|> expanded, and each clip's log-mel
    features, unpadded (a clip must sound the same alone and in a batch, see encode_audio)."""
    examples: list[dict]
    input_ids: torch.Tensor            # (P, L)
    attention_mask: torch.Tensor       # (P, L)
    input_features: list[torch.Tensor]  # P tensors (frames_p, 160)
    audio_mask: torch.Tensor           # (P, S): which projector outputs are real

    @property
    def references(self) -> list[list[str]]:
        return [references_of(ex) for ex in self.examples]


def make_batch(examples: list[dict], processor, device, audio: list | None = None) -> Batch:
    """Tokens and features of P examples; `audio` replaces their clips (the listening checks)."""
    audio = audio or [load_audio(ex["audio_path"], ex["where"]) for ex in examples]
    texts = [prompt_text(ex, processor.tokenizer) for ex in examples]
    inputs = processor(text=texts, audio=audio, return_tensors="pt", padding=True)
    # The processor pads the features of a batch to its longest clip; compute each clip's alone.
    features = [processor.audio_processor([clip])["input_features"][0].to(device) for clip in audio]
    return Batch(examples, inputs["input_ids"].to(device), inputs["attention_mask"].to(device),
                 features, inputs["input_features_mask"].to(device))


def batch_at(examples: list[dict], step: int, batch_size: int, seed: int) -> list[dict]:
    """Examples of step `step`: a fresh seeded shuffle every epoch, so that a resumed run sees
    exactly the batches an uninterrupted one would."""
    start = step * batch_size
    chosen = []
    while len(chosen) < batch_size:
        epoch, offset = divmod(start + len(chosen), len(examples))
        order = list(range(len(examples)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        take = min(batch_size - len(chosen), len(examples) - offset)
        chosen += [examples[i] for i in order[offset:offset + take]]
    return chosen


# --- Model: Granite Speech from transformers -------------------------------------------------
def load_model(cfg: Config, device):
    """Processor and GraniteSpeechForConditionalGeneration, loaded as for any HF checkpoint.

    Weights load from safetensors only. The speech encoder is frozen and in eval mode for good,
    the projector too unless --train_projector (SFT): the conformer's BatchNorm and dropout would
    otherwise give the rollout and the update different audio embeddings for the same clip, and
    an encoder trained through the LLM forgets how to hear (the paper trains the LLM side; the
    released models put LoRA on the LLM only). The LLM trains whole, or with --lora_rank r
    only a new LoRA on its linear layers does.
    """
    from transformers import GraniteSpeechForConditionalGeneration, GraniteSpeechProcessor
    # float32 by default, also on a GPU (with TF32 matmuls): AdamW updates of 1e-6 vanish in
    # bfloat16 weights. --dtype bfloat16 halves the memory for evaluation or a quick try.
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    options = dict(trust_remote_code=cfg.trust_remote_code)
    processor = GraniteSpeechProcessor.from_pretrained(cfg.model, **options)
    processor.tokenizer.padding_side = "left"          # prompts are left-padded for generation
    # Its warning that peft is missing does not apply: the adapter is merged (Part III).
    logging.getLogger("transformers.models.granite_speech.modeling_granite_speech").setLevel(logging.ERROR)
    model = GraniteSpeechForConditionalGeneration.from_pretrained(
        cfg.model, dtype=dtype, use_safetensors=True, **options).to(device)
    if model.config.has_lora_adapter or getattr(model, "_hf_peft_config_loaded", False):
        merge_audio_adapter(model, cfg.model)       # the real checkpoints' audio LoRA (Part III)
    choose_trainable(model, cfg)
    return processor, model


def choose_trainable(model, cfg: Config) -> None:
    """What trains: the whole LLM, or only a new LoRA on it (--lora_rank); never the speech
    encoder, and the projector only under --train_projector."""
    model.eval()
    model.model.language_model.requires_grad_(not cfg.lora_rank)
    model.lm_head.requires_grad_(not cfg.lora_rank)
    if cfg.lora_rank:
        add_lora(model.model.language_model, cfg.lora_rank)
    model.model.encoder.requires_grad_(False)
    model.model.projector.requires_grad_(cfg.train_projector)
    if cfg.gradient_checkpointing:
        model.model.language_model.activation_checkpointing_enable()


def set_train_mode(model, train_projector: bool) -> None:
    """Dropout on for what trains; the frozen encoder (and projector) stay deterministic."""
    model.train()
    model.model.encoder.eval()
    if not train_projector:
        model.model.projector.eval()


def logits_scale(model) -> float:
    """Granite LLMs divide their logits by text_config.logits_scaling (8 or 16 in the real
    checkpoints), but GraniteSpeechForConditionalGeneration's own lm_head skips it: we apply it
    in sampling and log-probs, or both would use a distribution that is far too sharp."""
    return float(getattr(model.config.text_config, "logits_scaling", 1.0) or 1.0)


def encode_audio(model, batch: Batch) -> torch.Tensor:
    """Speech encoder + projector, once per prompt, each clip alone: (P, S, H).

    The conformer has no padding mask: in a padded batch its attention and convolutions would
    mix padding into a clip's frames, so the same clip would give other embeddings (and other
    answers) with other batch mates. The encoder is frozen: it runs without gradients; the
    projector gets them when it is being trained.
    """
    encoder, projector = model.model.encoder, model.model.projector
    train_encoder = any(p.requires_grad for p in encoder.parameters())
    embeds = []
    for features in batch.input_features:                               # (frames, 160)
        with torch.set_grad_enabled(torch.is_grad_enabled() and train_encoder):
            hidden = encoder(features[None].to(model.dtype)).last_hidden_state
        embeds.append(projector(hidden)[0])                             # (S_p, H)
    return torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)    # (P, S, H)


def embed(model, input_ids, audio_embeds, audio_mask) -> torch.Tensor:
    """Token embeddings with the audio embeddings scattered into the <|audio|> positions."""
    return model.model.get_merged_audio_embeddings(input_ids, audio_embeds, audio_mask)


def completion_logits(model, prompt_ids, prompt_mask, audio_embeds, audio_mask, completion_ids):
    """Logits that predict each completion token: (B, T, V).

    The sequence is [left-padded prompt | completion]; positions count real tokens only, as in
    `generate`, so the log-probs here are those of the distribution the rollout sampled from.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(completion_ids)], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    if audio_embeds is None:                           # a text-only prompt (the toy base's pretraining)
        inputs_embeds = model.get_input_embeddings()(input_ids)
    else:
        inputs_embeds = embed(model, input_ids, audio_embeds, audio_mask)
    num_completion = completion_ids.shape[1]
    logits = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                   position_ids=position_ids, logits_to_keep=num_completion + 1).logits
    return logits[:, :-1] / logits_scale(model)        # the last position predicts nothing here


# --- Rollout: a group of G answers per prompt ------------------------------------------------
@torch.no_grad()
def sample(model, batch: Batch, audio_embeds, num_samples: int, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> torch.Tensor:
    """Generate `num_samples` completions per prompt with the KV cache: (P * num_samples, T).

    The audio is encoded once per prompt (`audio_embeds`) and generation starts from the merged
    embeddings: `generate(input_features=...)` would run the encoder on every copy of a prompt.
    Rows are grouped: completions of prompt p are rows p*G .. p*G + G-1.
    """
    from transformers import GenerationConfig, GenerationMixin
    tokenizer_eos = model.config.text_config.eos_token_id
    # logits_scaling folded into the temperature: softmax(z / s / T) = softmax(z / (s T)).
    sampling = {} if greedy else dict(temperature=temperature * logits_scale(model), top_p=top_p,
                                      top_k=0)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=not greedy, num_return_sequences=num_samples,
        eos_token_id=tokenizer_eos, pad_token_id=model.config.text_config.pad_token_id,
        suppress_tokens=[model.config.audio_token_id],   # the policy must not emit <|audio|>
        **sampling)
    inputs_embeds = embed(model, batch.input_ids, audio_embeds, batch.audio_mask)
    # GenerationMixin.generate, not model.generate: Granite Speech's override switches a LoRA
    # adapter off when no input_features are passed, which is what encode-once does.
    completion_ids = GenerationMixin.generate(model, inputs_embeds=inputs_embeds,
                                              attention_mask=batch.attention_mask,
                                              generation_config=config)
    if completion_ids.shape[1] == 0:
        completion_ids = torch.full((inputs_embeds.shape[0] * num_samples, 1), tokenizer_eos,
                                    device=inputs_embeds.device)
    return completion_ids


def decode(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    lengths = mask.sum(dim=1).long().tolist()
    return [tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
            for ids, n in zip(completion_ids.tolist(), lengths)]


def answer_ids(tokenizer, texts: list[str], eos_token_id: int) -> list[torch.Tensor]:
    """Token ids of reference answers followed by EOS, as the model would have to produce them."""
    return [torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_token_id])
            for text in texts]


@dataclass
class Rollout:
    """G answers for each of P prompts, in rows p*G .. p*G + G-1 (B = P * G), and what the loss
    needs of them. `rollout[rows]` is the same for some rows (a micro-batch)."""
    prompt_ids: torch.Tensor           # (B, L): each prompt repeated G times
    prompt_mask: torch.Tensor          # (B, L)
    audio_embeds: torch.Tensor         # (B, S, H): encoded once per prompt, then repeated
    audio_mask: torch.Tensor           # (B, S)
    completion_ids: torch.Tensor       # (B, T)
    completion_mask: torch.Tensor      # (B, T)
    off_policy: torch.Tensor           # (B,) bool: MP-GRPO's injected reference answers
    completions: list[str]             # B decoded answers
    references: list[list[str]]        # B lists of reference texts (each prompt's, G times)
    rewards: torch.Tensor | None = None       # (B,)
    advantages: torch.Tensor | None = None    # (B,)
    base_logp: torch.Tensor | None = None     # (B, T): log-probs under the base model (KL)

    def __len__(self) -> int:
        return len(self.completions)

    def __getitem__(self, rows: slice) -> Rollout:
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                          for f in dataclasses.fields(self)})


def sample_groups(cfg: Config, policy, processor, batch: Batch) -> Rollout:
    """Encode each clip once and sample G answers per prompt from the current policy; MP-GRPO
    replaces the last answer of each group with the reference (inject_reference)."""
    G, eos = cfg.group_size, policy.config.text_config.eos_token_id
    policy.eval()
    with torch.no_grad():
        audio_embeds = encode_audio(policy, batch)                              # (P, S, H)
    completion_ids = sample(policy, batch, audio_embeds, G, cfg.max_completion_length,
                            cfg.temperature)                                    # (B, T)
    mask = completion_mask(completion_ids, eos)                                 # (B, T)
    off_policy = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
    if cfg.algo == "mp_grpo":
        texts = [references_of(ex)[0] for ex in batch.examples]
        completion_ids, mask, off_policy = inject_reference(
            completion_ids, mask, answer_ids(processor.tokenizer, texts, eos), group_size=G,
            pad_token_id=policy.config.text_config.pad_token_id)

    def repeat(x):                       # every answer of a prompt shares its prompt and audio
        return x.repeat_interleave(G, dim=0)
    return Rollout(prompt_ids=repeat(batch.input_ids), prompt_mask=repeat(batch.attention_mask),
                   audio_embeds=repeat(audio_embeds), audio_mask=repeat(batch.audio_mask),
                   completion_ids=completion_ids, completion_mask=mask, off_policy=off_policy,
                   completions=decode(processor.tokenizer, completion_ids, mask),
                   references=[refs for refs in batch.references for _ in range(G)])


def answer_log_probs(model, rollout: Rollout, temperature: float,
                     entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(o_t | q, o_<t) of every answer token of these rows under `model`: (B, T); and
    with entropy=True the entropy of each next-token distribution, (B, T), detached: how
    sure the policy is, logged as TRL logs it (None otherwise)."""
    logits = completion_logits(model, rollout.prompt_ids, rollout.prompt_mask, rollout.audio_embeds,
                               rollout.audio_mask, rollout.completion_ids)
    logp = token_log_probs(logits, rollout.completion_ids, rollout.completion_mask, temperature)
    if not entropy:
        return logp, None
    with torch.no_grad():
        log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
        return logp, -(log_probs.exp() * log_probs).sum(dim=-1) * rollout.completion_mask


def micro_batches(rows: int, size: int) -> list[slice]:
    """Slices of at most `size` rows (0: all): the same numbers as one pass, less memory."""
    size = size or rows
    return [slice(start, start + size) for start in range(0, rows, size)]


# --- One GRPO step, one SFT step -------------------------------------------------------------
def grpo_step(cfg: Config, policy, base_model, processor, optimizer, batch: Batch,
              timer: Timer) -> tuple[dict, Rollout]:
    """One GRPO (or MP-GRPO) step on P prompts: sample, score, normalise, update. Returns the
    step's metrics and its rollout (rewards and advantages filled in)."""
    # 1. Rollout: G answers per prompt from the current policy.
    with timer("rollout"):
        rollout = sample_groups(cfg, policy, processor, batch)
    # 2. Rewards, and each answer's advantage over its own group.
    with timer("reward"):
        rollout.rewards = REWARDS[cfg.reward](rollout.completions, rollout.references)   # (B,)
        rollout.advantages = group_advantages(rollout.rewards, cfg.group_size, cfg.scale_rewards
                                              ).to(rollout.completion_mask.device)        # (B,)
    # 3. The loss's divisor N, of the whole batch: every micro-batch and process divides by it,
    #    so their gradients add up to the batch's.
    normalizer = all_sum(loss_normalizer(cfg.loss_type, rollout.completion_mask,
                                         cfg.max_completion_length))
    parts = micro_batches(len(rollout), cfg.micro_batch_size)
    # 4. Log-probs under the frozen base model, for the KL penalty.
    if cfg.beta > 0:
        with timer("reference"), torch.no_grad(), lora_off(base_model):
            rollout.base_logp = torch.cat([answer_log_probs(base_model, rollout[rows], cfg.temperature)[0]
                                           for rows in parts])
    # 5. Policy update(s). The first pass's log-probs are the old policy's: ratio 1 in it.
    set_train_mode(policy, cfg.train_projector)
    old_logp = None
    for _ in range(cfg.num_iterations):
        passes, new_logp = [], []
        for rows in parts:
            part = rollout[rows]
            with timer("forward"):
                logp, entropy = answer_log_probs(policy, part, cfg.temperature, entropy=True)
                loss, diagnostics = grpo_loss(
                    logp, logp.detach() if old_logp is None else old_logp[rows], part.base_logp,
                    part.advantages, part.completion_mask, off_policy=part.off_policy,
                    eps=cfg.eps, eps_high=cfg.eps_high, beta=cfg.beta, loss_type=cfg.loss_type,
                    policy_shaping=cfg.policy_shaping, normalizer=normalizer)
            backward(loss, timer)
            passes.append((loss.item(), {**diagnostics, "entropy": entropy}, part))
            new_logp.append(logp.detach())
        old_logp = torch.cat(new_logp) if old_logp is None else old_logp
        grad_norm = optimizer_step(policy, optimizer, cfg.max_grad_norm, timer)
    return grpo_metrics(rollout, passes, grad_norm, cfg.group_size), rollout


def sft_step(cfg: Config, policy, processor, optimizer, batch: Batch, timer: Timer,
             rng: random.Random) -> dict:
    """One supervised step: maximise the log-likelihood of one reference answer per example."""
    eos = policy.config.text_config.eos_token_id
    pad = policy.config.text_config.pad_token_id
    set_train_mode(policy, cfg.train_projector)
    targets = answer_ids(processor.tokenizer, [rng.choice(r) for r in batch.references], eos)
    target_ids = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True,
                                                 padding_value=pad).to(batch.input_ids.device)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(t)) for t in targets],
                                           batch_first=True).to(batch.input_ids.device)
    total, tokens = 0.0, all_sum(mask.sum().item())                      # of the global batch
    for rows in micro_batches(len(targets), cfg.micro_batch_size):
        with timer("forward"):
            with torch.set_grad_enabled(cfg.train_projector):
                audio_embeds = encode_audio(policy, dataclasses.replace(
                    batch, input_features=batch.input_features[rows]))         # (rows, S', H)
            width = batch.audio_mask.shape[1] - audio_embeds.shape[1]     # pad to the batch's S
            audio_embeds = torch.nn.functional.pad(audio_embeds, (0, 0, 0, width))
            logits = completion_logits(policy, batch.input_ids[rows], batch.attention_mask[rows],
                                       audio_embeds, batch.audio_mask[rows], target_ids[rows])
            loss = sft_loss(token_log_probs(logits, target_ids[rows], mask[rows]), mask[rows],
                            normalizer=max(tokens, 1.0))
        backward(loss, timer)
        total += loss.item()
    grad_norm = optimizer_step(policy, optimizer, cfg.max_grad_norm, timer)
    return {"loss": all_sum(total), "grad_norm": grad_norm.item(),
            "completion_tokens": tokens / all_sum(len(targets))}


# --- Evaluation: corpus BLEU, chrF, TER, ROUGE and WER on the test manifest -----------------
@torch.no_grad()
def evaluate(model, processor, examples: list[dict], cfg: Config, greedy: bool, seed: int) -> dict:
    """Answer every test clip once (sampled with top-p/temperature as in the paper, or greedy)
    and score the corpus (corpus_scores: BLEU, chrF, TER, ROUGE, WER). The RNG is forked:
    evaluating does not change the training run's random stream. Each clip is encoded alone,
    so the scores do not depend on --eval_batch_size."""
    from tqdm import tqdm
    model.eval()
    predictions = []
    device = next(model.parameters()).device
    shard = list(range(rank(), len(examples), world()))   # under torchrun each process a share
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + rank())
        for start in tqdm(range(0, len(shard), cfg.eval_batch_size), leave=False, disable=rank() > 0,
                          desc="eval greedy" if greedy else "eval sampled", file=sys.stderr):
            indices = shard[start:start + cfg.eval_batch_size]
            batch = make_batch([examples[i] for i in indices], processor, device,
                               replacement_audio(examples, indices, cfg.eval_audio))
            ids = sample(model, batch, encode_audio(model, batch), 1, cfg.max_completion_length,
                         cfg.eval_temperature, cfg.eval_top_p, greedy=greedy)
            mask = completion_mask(ids, model.config.text_config.eos_token_id)
            predictions += decode(processor.tokenizer, ids, mask)
    shards = all_gather(predictions)
    predictions = [shards[i % world()][i // world()] for i in range(len(examples))]
    return {**corpus_scores(predictions, [references_of(ex) for ex in examples]),
            "predictions": predictions}


# --- The training loop -----------------------------------------------------------------------
def train(cfg: Config) -> dict:
    """Evaluate the base model, train for cfg.steps, evaluate again; write metrics, model and
    results. Run (Part III) holds the set-up: device, data, models, optimizer, the output files,
    resuming and Ctrl-C."""
    with Run(cfg) as run:
        if cfg.steps == 0:
            return run.evaluate_only()
        if run.start_step == 0 and not cfg.skip_base_eval:
            run.evaluate_base()                 # the test scores before training
        for step in run.steps():                # from 0, or from the resumed checkpoint's step
            # The global batch has batch_size x processes prompts; each process takes its share.
            examples = batch_at(run.train_examples, step, run.batch_size * world(), cfg.seed)
            examples = examples[rank() * run.batch_size:(rank() + 1) * run.batch_size]
            with run.timer("data"):
                batch = make_batch(examples, run.processor, run.device)
            with run.stop_if_diverged(step + 1):
                if cfg.algo == "sft":       # the step's own seeded pick among the references
                    rollout, rng = None, random.Random(cfg.seed * 7919 + step)
                    metrics = sft_step(cfg, run.policy, run.processor, run.optimizer, batch,
                                       run.timer, rng)
                else:
                    metrics, rollout = grpo_step(cfg, run.policy, run.base_model, run.processor,
                                                 run.optimizer, batch, run.timer)
            run.scheduler.step()
            # Logs (metrics.jsonl, completions.jsonl, console), --eval_every, checkpoints.
            run.end_step(step + 1, metrics, batch, rollout)
        return run.finish()                 # final/, the test scores after training, results.json


# =============================================================================================
# Part III: plumbing — you may stop reading here.
# The algorithm is all above. What follows makes it a tool: input checks with one-line errors,
# the run's set-up and files (checkpoints, resume, Ctrl-C), torchrun, LoRA and the real
# checkpoints' adapter, reporting, and the command line.
# =============================================================================================
# --- Input checks ----------------------------------------------------------------------------
class UsageError(ValueError):
    """A bad option or input file: reported as one line, without a traceback."""


MAX_AUDIO_SECONDS = 60.0
MIN_AUDIO_SECONDS = 0.05


def check_config(cfg: Config) -> Config:
    """Reject bad options before any model is loaded: each option's choices, minimum and need
    (declared in Config), then the rules between options. Fills in the defaults that depend on
    other options."""
    for f in dataclasses.fields(Config):
        value, rule = getattr(cfg, f.name), f.metadata
        if rule["choices"] and value not in rule["choices"]:
            raise UsageError(f"unknown --{f.name} {value!r}: choose one of {', '.join(rule['choices'])}")
        if rule["minimum"] is not None and value < rule["minimum"]:
            raise UsageError(f"--{f.name} must be at least {rule['minimum']}, got {value}")
        if rule["need"] and not eval(rule["need"], {}, {f.name: value}):    # e.g. "0 < eps < 1"
            raise UsageError(f"--{f.name} {value}: need {rule['need']}")
    from transformers import SchedulerType
    schedulers = [kind.value for kind in SchedulerType]
    for broken, message in [
            (cfg.algo != "sft" and cfg.group_size < 2, f"--group_size {cfg.group_size}: GRPO "
             "compares answers within a group, it needs at least 2"),
            (cfg.algo != "sft" and cfg.train_projector, "--train_projector works with --algo sft "
             "only: GRPO encodes each clip once, without gradients"),
            (cfg.steps < -1, f"--steps must be at least 0 (or -1, the task's default), got {cfg.steps}"),
            (cfg.lr_scheduler not in schedulers, f"unknown --lr_scheduler {cfg.lr_scheduler!r}: "
             f"choose one of {', '.join(schedulers)}"),
            (cfg.device == "cuda" and not torch.cuda.is_available(),
             "--device cuda: no CUDA GPU is visible to torch")]:
        if broken:
            raise UsageError(message)
    # The toy AST base needs twice the steps to learn the data set's style (docs/results.md).
    cfg.steps = TASKS[cfg.task]["steps"] if cfg.steps == -1 else cfg.steps
    cfg.lr = DEFAULT_LR[cfg.algo] if cfg.lr == -1 else cfg.lr
    cfg.eps_high = cfg.eps if cfg.eps_high < 0 else cfg.eps_high
    toy = DATA_DIR / ("ast" if cfg.task == "asr" else cfg.task)   # AST clips have transcripts
    # Absolute paths: run.json must mean the same files when resumed from another directory.
    needed = ["test"]                             # --steps 0 only evaluates
    if cfg.steps:
        needed = ["train", "test"] + (["dev"] if cfg.eval_every else [])
    for name, default in (("train", toy / "train.jsonl"), ("test", toy / "test.jsonl"),
                          ("dev", toy / "dev.jsonl"),
                          ("output_dir", ROOT / "runs" / f"{cfg.task}-{cfg.algo}-seed{cfg.seed}")):
        path = Path(getattr(cfg, name) or default).expanduser()
        if name in needed and not path.is_file():
            raise UsageError(f"--{name} {getattr(cfg, name) or default}: " + (
                "a directory, not a manifest file" if path.is_dir() else "manifest file not found"))
        setattr(cfg, name, str(path.resolve()))
    check_model_path(cfg)
    return cfg


# The files a checkpoint directory needs (any one of each group), as transformers loads them.
CHECKPOINT_FILES = (("config.json",), ("model.safetensors", "model.safetensors.index.json"),
                    ("processor_config.json", "preprocessor_config.json"),
                    ("tokenizer.json", "tokenizer_config.json"))


def check_model_path(cfg: Config) -> None:
    """--model: a complete checkpoint directory (made absolute), or a hub id."""
    model = Path(cfg.model).expanduser()
    # "runs/x/final" with a typo is a path, not the hub id "runs/x": its first part exists here.
    if not model.is_dir() and (not re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.model)
                               or Path(model.parts[0]).exists()):
        raise UsageError(f"--model {cfg.model}: no such checkpoint directory (nor a hub id like org/name)")
    if model.is_dir():
        missing = [group[0] for group in CHECKPOINT_FILES if not any((model / f).is_file() for f in group)]
        if missing:
            hint = " (a run's model is in its final/ or checkpoint-*/)" if (model / "final").is_dir() else ""
            raise UsageError(f"--model {cfg.model}: not a complete checkpoint directory, no "
                             f"{', '.join(missing)}{hint}")
        cfg.model = str(model.resolve())


def load_manifest(path: str | Path, default_task: str) -> list[dict]:
    """Read and check a JSONL manifest. Each error names the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()    # -sig: a BOM is fine
    except UnicodeDecodeError as error:
        line = path.read_bytes()[:error.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text; save the manifest as UTF-8") from None
    examples = [check_example(line, f"{path}:{number}", path.parent, default_task)
                for number, line in enumerate(lines, start=1) if line.strip()]
    if not examples:
        raise UsageError(f"{path}: manifest has no examples")
    return examples


def check_example(line: str, where: str, folder: Path, default_task: str) -> dict:
    """One manifest line as an example dict, or a UsageError that names file:line."""
    try:
        example = json.loads(line)
    except json.JSONDecodeError as error:
        raise UsageError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(example, dict):
        raise UsageError(f"{where}: expected a JSON object")
    task = example.setdefault("task", default_task)
    if task not in TASKS:
        raise UsageError(f"{where}: unknown task {task!r}")
    for name in ("audio",) + TASKS[task]["fields"]:
        if name not in example:
            raise UsageError(f"{where}: missing field {name!r}")
    for name in ("translation", "answer"):
        if name in example and isinstance(example[name], str):
            example[name] = [example[name]]          # one reference may be a plain string
    for name in ("audio", "text", "question", "translation", "answer"):
        value = example.get(name, "")
        many = name in ("translation", "answer")                # one or more references
        if many and value == []:
            raise UsageError(f"{where}: {name!r} is an empty list; give at least one reference")
        values = value if many and isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in values):
            kind = "a string or a list of strings" if many else "a string"
            raise UsageError(f"{where}: {name!r} must be {kind}, got {json.dumps(value)[:40]}")
        if name in ("audio", "question") + TASKS[task]["fields"] and name in example and not all(
                v.strip() for v in values):
            raise UsageError(f"{where}: empty {'reference text' if many else name}")
    example["audio_path"] = str((folder / example["audio"]).resolve())
    example["where"] = where
    return example


def ensure_audio(examples: list[dict]) -> None:
    """Check that every clip exists and that its header is readable and of a usable length,
    before any model loads (a bad clip on line 24 must not stop a run after hours). The bundled
    toy data is synthesized on first use (its manifests carry eSpeak NG recipes, see
    data/make_data.py); a user's missing file is an error."""
    missing = [ex for ex in examples if not os.path.isfile(ex["audio_path"])]
    toy = [ex for ex in missing if Path(ex["audio_path"]).is_relative_to(DATA_DIR)]
    if all_sum(len(toy)) > 0:           # under torchrun one process makes them, the rest wait
        if rank() == 0 and subprocess.run([sys.executable, str(DATA_DIR / "make_data.py"),
                                           "--synthesize"]).returncode:
            raise UsageError("synthesizing the toy audio failed (its message is above); "
                             "python data/make_data.py --synthesize retries it")
        if world() > 1:
            torch.distributed.barrier()
        missing = [ex for ex in missing if not os.path.isfile(ex["audio_path"])]
    if missing:
        raise UsageError(f"{missing[0]['where']}: audio file not found: {missing[0]['audio_path']}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    import soundfile
    for example in examples:
        path, where = example["audio_path"], example["where"]
        try:
            info = soundfile.info(path)
        except Exception as error:
            raise UsageError(f"{where}: cannot read audio {path} ({error})") from None
        check_duration(info.frames / info.samplerate, path, where)
        if info.subtype in ("FLOAT", "DOUBLE"):     # only float samples can be NaN: read them now
            load_audio(path, where)


def load_audio(path: str, where: str = "") -> torch.Tensor:
    """Mono float32 waveform at 16 kHz, shape (samples,).

    Files are read with soundfile (libsndfile: WAV of any sample format, FLAC, MP3, OGG), which
    needs no FFmpeg, unlike torchaudio.load. Stereo is averaged to mono, other sample rates are
    resampled with torchaudio, and clips longer than MAX_AUDIO_SECONDS are an error rather than
    silently truncated (the encoder has no hard limit, but memory and the LLM's context do).
    """
    import numpy as np
    import soundfile
    where = where or path
    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)   # (samples, channels)
    except Exception as error:                         # unreadable, truncated, not audio at all
        raise UsageError(f"{where}: cannot read audio {path} ({error})") from None
    if data.size == 0:
        raise UsageError(f"{where}: audio {path} has no samples")
    if not np.isfinite(data).all():                 # a float WAV can hold NaN or inf samples
        raise UsageError(f"{where}: audio {path} has NaN or infinite samples")
    check_duration(len(data) / rate, path, where)
    samples = torch.from_numpy(data).mean(dim=1)       # (samples, channels) -> (samples,)
    if rate != SAMPLING_RATE:
        import torchaudio
        samples = torchaudio.functional.resample(samples, rate, SAMPLING_RATE)
    return samples


def check_duration(seconds: float, path: str, where: str) -> None:
    if seconds > MAX_AUDIO_SECONDS:
        raise UsageError(f"{where}: audio is {seconds:.0f} s long, more than the "
                         f"{MAX_AUDIO_SECONDS:.0f} s this script accepts; split it")
    if seconds < MIN_AUDIO_SECONDS:     # too short for a word (and for the mel's padding)
        raise UsageError(f"{where}: audio {path} is {1000 * seconds:.0f} ms long, shorter than "
                         f"{1000 * MIN_AUDIO_SECONDS:.0f} ms")


def load_data(cfg: Config) -> tuple[list[dict], list[dict], list[dict]]:
    """The train, test and dev examples, every line and every clip checked before training."""
    train = load_manifest(cfg.train, cfg.task) if cfg.steps else []
    test = load_manifest(cfg.test, cfg.task)[:cfg.eval_limit or None]
    dev = load_manifest(cfg.dev, cfg.task)[:cfg.dev_limit or None] if cfg.eval_every and cfg.steps else []
    ensure_audio(train + test + dev)
    return train, test, dev


# --- The run: set-up, files, resume, Ctrl-C --------------------------------------------------
class TrainingStopped(RuntimeError):
    """The run stopped early on purpose (Ctrl-C, or a NaN loss): a one-line message, exit 1."""


class Run:
    """Everything train() needs besides the algorithm: device and seeds, data, the policy and
    the frozen base model, optimizer and scheduler (restored from --resume), the output files,
    the progress bar and Ctrl-C. `with Run(cfg) as run:` sets it up and closes its files."""

    def __init__(self, cfg: Config):
        from contextlib import ExitStack
        self.cfg, self.timer, self.files = cfg, Timer(), ExitStack()
        try:
            self.set_up(cfg)
        except BaseException:
            self.files.close()                   # the output directory's lock goes with the run
            raise

    def set_up(self, cfg: Config) -> None:
        self.device = setup_device(cfg)
        self.is_main = rank() == 0         # under torchrun only the first process writes and prints
        if not self.is_main:
            sys.stdout = open(os.devnull, "w")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed + rank())   # each process samples its own prompts' groups
        self.output_dir, old = claim_output_dir(cfg, self.files) if self.is_main else (Path(cfg.output_dir), [])
        self.train_examples, self.test_examples, self.dev_examples = load_data(cfg)
        for path in old:            # --overwrite_output_dir, once every input has been checked
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.processor, self.policy = load_model(cfg, self.device)
        self.results = {"config": dataclasses.asdict(cfg), "world_size": world(), "before": {}, "after": {}}
        self.start_step, self.seconds_before = 0, 0.0
        self.batch_size = cfg.sft_batch_size if cfg.algo == "sft" else cfg.batch_size
        if cfg.steps:
            self.prepare_training(Path(cfg.resume) if cfg.resume else None)

    def prepare_training(self, checkpoint: Path | None) -> None:
        from transformers import get_scheduler
        cfg = self.cfg
        self.base_model = None   # pi_ref of the KL term: frozen; with LoRA, the LoRA switched off
        if cfg.algo != "sft" and cfg.beta > 0:
            self.base_model = self.policy if cfg.lora_rank else copy.deepcopy(self.policy).eval().requires_grad_(False)
        if checkpoint:                     # the policy continues; the base model stays the base
            self.policy = resumed_policy(cfg, self.policy, checkpoint, self.device)
        print(memory_report(self.policy, self.base_model))
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer,
                                       num_warmup_steps=int(cfg.warmup_ratio * cfg.steps),
                                       num_training_steps=cfg.steps)
        if checkpoint:
            self.start_step, self.seconds_before = restore(checkpoint, self.optimizer,
                                                           self.scheduler, self.output_dir)
            if (self.output_dir / "base_eval.json").is_file():
                self.results["before"] = json.loads((self.output_dir / "base_eval.json").read_text())

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.files.close()

    def evaluate(self, label: str, model) -> dict:
        """Test scores of `model`, sampled and greedy, printed with a few answers."""
        with self.timer("eval"):
            evaluation = evaluate_modes(model, self.processor, self.test_examples, self.cfg)
        print_eval(label, evaluation, self.test_examples, self.cfg.examples)
        return evaluation

    def evaluate_base(self) -> None:
        self.results["before"] = self.evaluate("base", self.policy)
        if self.is_main:
            (self.output_dir / "base_eval.json").write_text(json.dumps(self.results["before"]))

    def steps(self):
        """The steps left to run, as a progress bar; opens the logs and catches Ctrl-C."""
        from tqdm import tqdm
        cfg, opened = self.cfg, {}
        for name in ("metrics", "completions"):
            path = self.output_dir / f"{name}.jsonl" if self.is_main else os.devnull
            opened[name] = self.files.enter_context(open(path, "a", encoding="utf-8"))
        self.metrics_file, self.completions_file = opened["metrics"], opened["completions"]
        self.stop = self.files.enter_context(StopRequest())
        self.progress = tqdm(range(self.start_step, cfg.steps), desc=f"{cfg.algo} {cfg.task}",
                             file=sys.stderr, dynamic_ncols=True, initial=self.start_step,
                             total=cfg.steps, disable=not self.is_main)
        self.files.callback(self.progress.close)
        self.train_start = time.perf_counter()
        return self.progress

    @contextmanager
    def stop_if_diverged(self, step: int):
        """A NaN loss or gradient (or NaN logits in sampling) stops the run before the weights
        change, naming the last good checkpoint."""
        try:
            yield
        except (FloatingPointError, RuntimeError) as error:
            if isinstance(error, RuntimeError) and "probability tensor" not in str(error):
                raise
            last = checkpoints(self.output_dir)
            raise TrainingStopped(f"step {step}: {str(error).splitlines()[0]}; stopped before "
                                  f"updating the weights. Last good checkpoint: "
                                  f"{last[-1] if last else 'none (use --save_every)'}") from None

    def end_step(self, step: int, metrics: dict, batch: Batch, rollout: Rollout | None) -> None:
        """After each step: time and learning rate, the --eval_every dev score (best/ keeps the
        best model), metrics.jsonl and completions.jsonl, the console, and a checkpoint when
        --save_every says so or Ctrl-C asked for one."""
        cfg = self.cfg
        metrics.update(step=step, lr=self.scheduler.get_last_lr()[0],
                       seconds=round(self.seconds_before + time.perf_counter() - self.train_start, 2))
        if cfg.eval_every and step % cfg.eval_every == 0:
            with self.timer("eval"):
                metrics["dev_bleu"] = evaluate(self.policy, self.processor, self.dev_examples,
                                               cfg, True, cfg.seed)["bleu"]
            if self.is_main:
                keep_best(self.policy, self.processor, step, metrics["dev_bleu"], self.output_dir)
        groups = [] if rollout is None else [g for part in all_gather(group_records(
            step, batch, rollout, cfg.group_size)) for g in part]     # every process's groups
        write_lines(self.metrics_file, [metrics])
        write_lines(self.completions_file, groups)
        shown = {k: metrics[k] for k in ("loss", "reward", "kl", "clip_fraction") if k in metrics}
        self.progress.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
        if cfg.log_every and step % cfg.log_every == 0:
            self.progress.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in metrics.items()))
            if groups:
                self.progress.write(format_group(groups[0]))
        stopping = all_sum(self.stop.requested) > 0            # every process stops at this step
        if stopping and step == cfg.steps:       # nothing is left to train: finish as usual
            print("stop requested at the last step: writing final/, then the final evaluation "
                  "(Ctrl-C again to skip it)", file=sys.stderr)
            stopping = False
        if stopping or (cfg.save_every and step % cfg.save_every == 0):
            saved = save_checkpoint(self.output_dir, step, self.policy, self.processor,
                                    self.optimizer, self.scheduler, cfg)
            if stopping:
                self.progress.close()
                raise TrainingStopped(f"interrupted: saved {saved}; continue with: "
                                      f"{resume_command(saved, world())}")

    def finish(self) -> dict:
        """final/ (written before the long evaluation), the test scores after training (and of
        the dev-best model), timing; results.json, predictions.jsonl and the summary."""
        cfg, results = self.cfg, self.results
        self.progress.close()
        steps_run, train_seconds = cfg.steps - self.start_step, time.perf_counter() - self.train_start
        if self.is_main:
            save_model(self.policy, self.processor, self.output_dir / "final", cfg.save_dtype)
        if world() > 1:
            torch.distributed.barrier()     # best/ and final/ are on disk for every process
        results["after"] = self.evaluate(f"after {cfg.algo}", self.policy)
        if (self.output_dir / "best" / "best.json").is_file():   # --eval_every: the dev-best too
            results["best"] = json.loads((self.output_dir / "best" / "best.json").read_text())
            _, best = load_model(dataclasses.replace(cfg, model=str(self.output_dir / "best"),
                                                     lora_rank=0), self.device)
            results["best"].update(self.evaluate(f"best on dev, step {results['best']['step']}", best))
        results["timing"] = timing_summary(self.timer, steps_run, train_seconds)
        if self.is_main:
            write_predictions(self.output_dir / "predictions.jsonl", self.test_examples, results)
            write_atomically(self.output_dir / "results.json", json.dumps(results, indent=1))
            print_summary(results, cfg)
        return results

    def evaluate_only(self) -> dict:
        """--steps 0: score --model on --test, sampled and greedy; results.json keeps the
        predictions."""
        cfg, start = self.cfg, time.perf_counter()
        results = {"config": dataclasses.asdict(cfg),
                   "eval": evaluate_modes(self.policy, self.processor, self.test_examples, cfg)}
        print_eval(f"{cfg.model}, {cfg.eval_audio}", results["eval"], self.test_examples, cfg.examples)
        if self.is_main:
            write_atomically(self.output_dir / "results.json",
                             json.dumps(results, indent=1, ensure_ascii=False))
            print(f"evaluated {len(self.test_examples)} clips in {time.perf_counter() - start:.0f} s;"
                  f" wrote {self.output_dir}/results.json")
        return results


RUN_FILES = ("metrics.jsonl", "completions.jsonl", "results.json", "base_eval.json",
             "predictions.jsonl", "final", "best")


def claim_output_dir(cfg: Config, owned) -> tuple[Path, list[Path]]:
    """The run's output directory, writable and locked for the run's life (the lock's release
    goes on `owned`, an ExitStack), and the old files --overwrite_output_dir will delete once
    the inputs are checked. Another run's files are refused, also when resuming from a
    checkpoint of another directory; the model to evaluate or continue is never deleted."""
    output_dir = Path(cfg.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / ".write-test").write_text("")
        (output_dir / ".write-test").unlink()
    except OSError as error:
        raise UsageError(f"--output_dir {output_dir}: cannot write there ({error.strerror})") from None
    owned.callback(lock_output_dir(output_dir).unlink, missing_ok=True)
    old = [p for p in output_dir.iterdir() if p.name in RUN_FILES] + checkpoints(output_dir)
    # The checkpoint's own run (wherever the checkpoint lies) may continue in its directory.
    own_run = cfg.resume and Path(json.loads((Path(cfg.resume) / "run.json").read_text())
                                  ["config"]["output_dir"]).resolve() == output_dir.resolve()
    if not old or own_run:
        return output_dir, []
    if not cfg.overwrite_output_dir:
        raise UsageError(f"--output_dir {output_dir} holds another run's files "
                         f"({', '.join(sorted(p.name for p in old)[:3])}, ...): "
                         + ("continue it with --resume last, " if not cfg.resume else "")
                         + "replace it with --overwrite_output_dir, or choose another --output_dir")
    model = Path(cfg.model).resolve()
    if any(model == p.resolve() or p.resolve() in model.parents for p in old):
        raise UsageError(f"--model {cfg.model} is inside --output_dir {output_dir}, whose old files "
                         f"--overwrite_output_dir would delete: choose another --output_dir")
    return output_dir, old


def lock_output_dir(output_dir: Path) -> Path:
    """A run owns its output directory: .lock holds its process id and host, and a second run
    meets a one-line error. The lock of a run that was killed (its process gone) is taken over."""
    lock, me = output_dir / ".lock", {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = json_or_none(lock.read_text()) or {}
            if not owner.get("pid") or owner.get("host") == me["host"] and not process_alive(owner["pid"]):
                lock.unlink(missing_ok=True)                 # a killed run's lock
                continue
            raise UsageError(f"--output_dir {output_dir} is in use by another run (process "
                             f"{owner['pid']} on {owner.get('host')}); wait for it or choose another "
                             f"--output_dir (if that run is gone, delete {lock})") from None
        with os.fdopen(descriptor, "w") as f:
            json.dump(me, f)
        return lock
    raise UsageError(f"--output_dir {output_dir}: cannot take its lock {lock}")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                 # alive, another user's
        return True
    return True


class OutputError(TrainingStopped):
    """A write that failed (a full disk, permissions): one line naming what was kept."""
    def __init__(self, path: Path, error: Exception):
        self.error = error = getattr(error, "error", error)       # the first cause, if re-raised
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        kept = checkpoints(path.parent)
        super().__init__(f"cannot write {path} ({reason}); nothing half-written was left. "
                         + (f"Kept: {kept[-1]}" if kept else "No checkpoint was kept (--save_every)"))


def save_model(model, processor, directory: Path, save_dtype: str = "auto") -> None:
    """A plain checkpoint, written to a temporary directory and renamed: a failed write leaves
    the previous one (or none), never half of one."""
    tmp = directory.with_name(f".tmp-{directory.name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if save_dtype in ("float32", "bfloat16"):
            model = copy.deepcopy(model).to(getattr(torch, save_dtype))
        model.save_pretrained(tmp, state_dict=plain_state_dict(model), safe_serialization=True)
        processor.save_pretrained(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for file in tmp.iterdir():      # safetensors writes 0600; make it like the other files
            file.chmod(0o666 & ~umask)
    except Exception as error:          # OSError, or safetensors' own error for a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(directory, error) from None
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


def write_atomically(path: Path, text: str) -> None:
    """A file written whole or not at all (a temporary file, then a rename)."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        tmp.write_text(text, encoding="utf-8")
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OutputError(path, error) from None
    os.replace(tmp, path)


def keep_best(policy, processor, step: int, dev_bleu: float, output_dir: Path) -> None:
    """best/ holds the model of the step with the highest dev score so far (the paper's
    "best checkpoint on validation"); best/best.json says which step."""
    record = output_dir / "best" / "best.json"
    if record.is_file() and json.loads(record.read_text())["dev_bleu"] >= dev_bleu:
        return
    save_model(policy, processor, output_dir / "best")
    record.write_text(json.dumps({"step": step, "dev_bleu": dev_bleu}))


def save_checkpoint(output_dir: Path, step: int, policy, processor, optimizer, scheduler,
                    cfg: Config) -> Path:
    """Everything a run needs to continue: weights (safetensors), optimizer and scheduler
    state, RNG states, the step and the run's options (run.json). Written to a temporary
    directory and renamed, so a crash mid-write never leaves a half checkpoint; only the newest
    --keep_checkpoints are kept."""
    final = output_dir / f"checkpoint-{step:06d}"
    rng = all_gather({"torch": torch.get_rng_state(), "python": random.getstate(),   # per process
                      "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})
    if rank() > 0:
        return final
    tmp = output_dir / f".tmp-checkpoint-{step:06d}"
    try:
        save_model(policy, processor, tmp)
        if cfg.lora_rank:           # to resume: the LoRA itself, not only the merged model
            from safetensors.torch import save_file
            save_file({n: p.detach().contiguous() for n, p in policy.named_parameters() if p.requires_grad},
                      tmp / "trainable.safetensors")
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng}
        torch.save(state, tmp / "trainer_state.pt")
        (tmp / "run.json").write_text(json.dumps({"step": step, "world_size": world(),
                                                  "config": dataclasses.asdict(cfg)}))
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(final, error) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(output_dir)[:-cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def resume_command(checkpoint: Path, processes: int) -> str:
    launcher = "python" if processes == 1 else f"torchrun --nproc_per_node {processes}"
    return f"{launcher} grpo_speech.py --resume {shlex.quote(str(checkpoint))}"


def checkpoints(output_dir: Path) -> list[Path]:
    """Step checkpoints, oldest first (by step number, not by name)."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def resume_config(cfg: Config, given: set[str]) -> Config:
    """--resume: find the checkpoint, check its files, and take the run's options from it;
    options given again on the command line win (and are named)."""
    if not cfg.resume:
        return cfg
    if cfg.resume == "last":
        output_dir = Path(cfg.output_dir or ROOT / "runs" / f"{cfg.task}-{cfg.algo}-seed{cfg.seed}")
        found = checkpoints(output_dir)
        if not found:
            raise UsageError(f"--resume last: no checkpoint in {output_dir}")
        path = found[-1]
    else:
        path = Path(cfg.resume)
    if (path / "config.json").is_file() and not (path / "run.json").is_file():
        raise UsageError(f"--resume {path}: a model, not a resumable checkpoint (no run.json); "
                         f"to train it further, start a run with --model {path}")
    # Cheap checks here, before anything loads (the weights only by their header and size);
    # trainer_state.pt is checked where it is loaded (restore), so nothing is read twice.
    for name, check in (("run.json", lambda f: json.loads(f.read_text())),
                        ("config.json", lambda f: json.loads(f.read_text())),
                        ("model.safetensors", safetensors_complete)):
        try:
            if check(path / name) is False:
                raise ValueError("shorter than its header says")
        except Exception as error:
            raise damaged(path, name, error) from None
    saved = json.loads((path / "run.json").read_text())
    restored = {name: value for name, value in saved["config"].items()
                if name not in given | {"resume", "overwrite_output_dir"}}
    changed = sorted(n for n in given - {"resume"} if getattr(cfg, n) != saved["config"].get(n))
    if changed:
        print(f"resume: options given again override the checkpoint's: {', '.join(changed)}",
              file=sys.stderr)
    cfg = dataclasses.replace(cfg, **restored, resume=str(path))
    processes, now = saved.get("world_size", 1), int(os.environ.get("WORLD_SIZE", 1))
    if processes != now:                     # another world size is another global batch
        raise UsageError(f"--resume {path}: the run had {processes} process(es), a global batch "
                         f"of {processes * cfg.batch_size} prompts; this one has {now}. Continue it "
                         f"with: {resume_command(path, processes)}")
    if saved["step"] >= cfg.steps:
        raise UsageError(f"--resume {path}: the checkpoint is at step {saved['step']} and "
                         f"--steps is {cfg.steps}: nothing left to train (raise --steps)")
    return cfg


def safetensors_complete(path: Path) -> bool:
    """True if a safetensors file is as long as its header says (a cut copy is not)."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
    end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
    return path.stat().st_size == 8 + header_size + end


def damaged(checkpoint: Path, name: str, error: Exception) -> UsageError:
    earlier = [p for p in checkpoints(checkpoint.parent) if p != checkpoint]
    return UsageError(f"--resume {checkpoint}: {name} is missing or damaged ({type(error).__name__}); "
                      + (f"try --resume {earlier[-1]}" if earlier else "no earlier checkpoint"))


def resumed_policy(cfg: Config, policy, checkpoint: Path, device):
    """The policy of a checkpoint: a LoRA run puts its LoRA (trainable.safetensors) back on the
    base model; a full run loads the checkpoint's weights."""
    if not cfg.lora_rank:
        return load_model(dataclasses.replace(cfg, model=str(checkpoint)), device)[1]
    from safetensors.torch import load_file
    if not (checkpoint / "trainable.safetensors").is_file() and (checkpoint / "model.safetensors").is_file():
        raise UsageError(f"--resume {checkpoint}: a checkpoint of the whole LLM, not of a LoRA: "
                         f"continue it without --lora_rank, or start a LoRA run with --model {checkpoint}")
    try:
        trainable = load_file(checkpoint / "trainable.safetensors")
    except Exception as error:
        raise damaged(checkpoint, "trainable.safetensors", error) from None
    try:
        unexpected = policy.load_state_dict(trainable, strict=False).unexpected_keys
    except RuntimeError as error:                      # e.g. another --lora_rank
        unexpected = [str(error).splitlines()[-1].strip()]
    if unexpected:
        raise UsageError(f"--resume {checkpoint}: trainable.safetensors does not fit this "
                         f"model ({unexpected[0]}; another --lora_rank?)")
    return policy


def restore(checkpoint: Path, optimizer, scheduler, output_dir: Path) -> tuple[int, float]:
    """Optimizer, scheduler and RNG states of a checkpoint; the log lines of later steps are
    dropped (and a line cut short by a crash). Returns (step, training seconds so far)."""
    try:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    except Exception as error:
        raise damaged(checkpoint, "trainer_state.pt", error) from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][min(rank(), len(state["rng"]) - 1)]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    kept = {}
    for name in ("metrics.jsonl", "completions.jsonl"):
        path = output_dir / name
        lines = map(json_or_none, path.read_text().splitlines()) if path.is_file() else []
        kept[name] = [row for row in lines if row and row.get("step", state["step"] + 1) <= state["step"]]
        if rank() == 0:
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept[name]))
    print(f"resuming from {checkpoint} at step {state['step']}")
    return state["step"], kept["metrics.jsonl"][-1]["seconds"] if kept["metrics.jsonl"] else 0.0


def json_or_none(line: str):
    """A log line, or None for a line cut short by a crash."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class StopRequest:
    """First Ctrl-C (or SIGTERM, as schedulers send): finish the current step, save a
    checkpoint, exit. Second: stop at once."""
    requested = False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: saving a checkpoint after this step (again to quit now)", file=sys.stderr)

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


# --- torchrun, gradients and the optimizer step ----------------------------------------------
def setup_device(cfg: Config) -> torch.device:
    """One process, or one of N started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK set): then
    NCCL between GPUs, or gloo between CPU processes."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        return torch.device("cuda" if cuda else "cpu")
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def all_sum(value: float) -> float:
    """The sum of a number over all processes (the number itself in a single process)."""
    if world() == 1:
        return value
    gpu = torch.distributed.get_backend() == "nccl"
    total = torch.tensor(float(value), dtype=torch.float64, device="cuda" if gpu else "cpu")
    torch.distributed.all_reduce(total)
    return total.item()


def all_gather(value) -> list:
    """Every process's `value` (any picklable object), in rank order."""
    if world() == 1:
        return [value]
    gathered = [None] * world()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


class Timer:
    """Wall time per phase, for the summary at the end."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def backward(loss: torch.Tensor, timer: Timer) -> None:
    """Accumulate a (micro-batch's) gradient. A NaN/inf loss stops before the weights change."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}")
    with timer("backward"):
        loss.backward()


def optimizer_step(policy, optimizer, max_grad_norm: float, timer: Timer) -> torch.Tensor:
    """Sum the gradients over processes, clip, step, clear. A NaN/inf gradient stops before
    the step. Each process's loss was divided by the global batch's normaliser, so the summed
    gradient is the global batch's: what DDP does, without its wrapper, because
    the log-prob passes call the model's parts (encoder, embeddings, LLM) directly."""
    trainable = [p for p in policy.parameters() if p.requires_grad]
    with timer("optimizer"):
        for p in trainable if world() > 1 else []:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
            torch.distributed.all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(     # inf: only measure (0 = no clipping)
            trainable, max_grad_norm or float("inf"))
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"gradient norm is {grad_norm.item()}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return grad_norm


# --- LoRA, and the real checkpoints' audio adapter -------------------------------------------
def merge_audio_adapter(model, checkpoint: str) -> None:
    """The real checkpoints ship a LoRA adapter on the LLM that is on for every prompt with
    audio, that is every prompt here. Merge it into the weights once, W <- W + (alpha / r) B A:
    the LLM then trains as a plain model and saves a plain checkpoint (has_lora_adapter false)
    that reloads exactly, and peft is not needed."""
    if getattr(model, "_hf_peft_config_loaded", False):
        raise UsageError("peft is installed, so transformers loaded the checkpoint's LoRA adapter "
                         "itself and cannot switch it on with this peft; uninstall peft (the "
                         "adapter is merged into the weights here instead)")
    from safetensors.torch import load_file
    from transformers.utils import cached_file

    def adapter_file(name):              # a local directory, or the hub cache (downloaded once)
        return Path(checkpoint) / name if Path(checkpoint).is_dir() else cached_file(checkpoint, name)
    try:
        adapter = json.loads(Path(adapter_file("adapter_config.json")).read_text())
        lora = load_file(adapter_file("adapter_model.safetensors"))
    except Exception as error:
        raise UsageError(f"--model {checkpoint}: has_lora_adapter is set but the adapter cannot "
                         f"be read ({str(error).splitlines()[0]})") from None
    if adapter.get("use_dora") or adapter.get("use_rslora") or adapter.get("fan_in_fan_out"):
        raise UsageError(f"--model {checkpoint}: only a plain LoRA adapter can be merged")
    scale = adapter["lora_alpha"] / adapter["r"]
    llm = dict(model.model.language_model.named_parameters())        # "layers.0.self_attn...."
    for name, A in lora.items():
        if ".lora_A." not in name:
            continue
        target = name[name.find("layers."):].replace(".lora_A.weight", ".weight")
        if target not in llm:
            raise UsageError(f"--model {checkpoint}: adapter weight {name} fits no LLM weight")
        B = lora[name.replace(".lora_A.", ".lora_B.")]
        with torch.no_grad():
            llm[target] += (scale * B.double() @ A.double()).to(llm[target])
    model.config.has_lora_adapter = False


class LoRALinear(torch.nn.Module):
    """y = W x + (alpha / r) B A x with W frozen, A (r, in) random and B (out, r) zero, so that
    training starts exactly at the base model (Hu et al. 2021; peft's initialisation). With
    enabled = False it is the base layer again: the KL's base model, without a copy."""
    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale, self.enabled = base.requires_grad_(False), alpha / rank, True
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, **like))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.scale * (x @ self.lora_A.T) @ self.lora_B.T if self.enabled else y

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * self.lora_B @ self.lora_A


def add_lora(llm: torch.nn.Module, rank: int) -> None:
    """Every linear layer of the LLM's decoder layers (attention and MLP) gets a LoRA; alpha = 2 r."""
    for module in list(llm.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha=2 * rank))


@contextmanager
def lora_off(model):
    """The base model inside the block: pi_ref of a LoRA run (a no-op for a model without one)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def plain_state_dict(model) -> dict:
    """The weights under their usual names, each LoRA merged (W + s B A): checkpoints stay plain
    Granite Speech checkpoints that any code loads."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            for key in ("lora_A", "lora_B", "base.weight"):
                del state[f"{name}.{key}"]
            # on the CPU, one layer at a time: a GPU never holds a second copy of the LLM
            state[f"{name}.weight"] = module.merged_weight().detach().cpu()
            if module.base.bias is not None:
                state[f"{name}.bias"] = state.pop(f"{name}.base.bias")
    return state


# --- Reporting -------------------------------------------------------------------------------
def grpo_metrics(rollout: Rollout, passes: list[tuple[float, dict, Rollout]], grad_norm,
                 group_size: int) -> dict:
    """A GRPO step's logged numbers over the global batch (sums over processes): the loss (its
    passes' sum), the reward's mean and spread over sampled answers (MP-GRPO's injected
    references left out), the grad norm, the answers' mean length in tokens, the share of groups
    whose rewards are all equal (no signal), grpo_loss's diagnostics, each weighted by the
    tokens it is a mean over (ratio and clip fraction sampled ones, KL all), and the policy's
    mean next-token entropy over the sampled answers' tokens."""
    mask = rollout.completion_mask
    on_policy = rollout.rewards[~rollout.off_policy.cpu()].double()
    n, total = all_sum(len(on_policy)), all_sum(on_policy.sum().item())
    spread = all_sum(((on_policy - total / n) ** 2).sum().item())
    no_signal = (rollout.rewards.view(-1, group_size).std(dim=1) == 0).sum().item()
    metrics = {"loss": all_sum(sum(loss for loss, _, _ in passes)), "reward": total / n,
               "reward_std": (spread / max(n - 1, 1)) ** 0.5, "grad_norm": grad_norm.item(),
               "completion_tokens": all_sum(mask.sum().item()) / all_sum(len(mask)),
               "zero_std_groups": all_sum(no_signal) / all_sum(len(mask) // group_size)}
    for name in ("ratio", "clip_fraction", "kl"):
        weights = [(part.completion_mask if name == "kl" else part.completion_mask
                    * (~part.off_policy).unsqueeze(1)).sum().item() for _, _, part in passes]
        weighted = sum(diagnostics[name] * w for (_, diagnostics, _), w in zip(passes, weights))
        metrics[name] = all_sum(weighted) / max(all_sum(sum(weights)), 1.0)
    sampled = [(d["entropy"], part.completion_mask * (~part.off_policy).unsqueeze(1)) for _, d, part in passes]
    metrics["entropy"] = (all_sum(sum((e * m).sum().item() for e, m in sampled))     # nats per token
                          / max(all_sum(sum(m.sum().item() for _, m in sampled)), 1.0))
    return metrics


def group_records(step: int, batch: Batch, rollout: Rollout, group_size: int) -> list[dict]:
    """One line of completions.jsonl per prompt: its G answers with their rewards and advantages
    (`injected`: which answer is MP-GRPO's reference)."""
    records = []
    for p, example in enumerate(batch.examples):
        rows = slice(p * group_size, (p + 1) * group_size)
        injected = rollout.off_policy[rows].nonzero().flatten().tolist()
        records.append({"step": step, "where": example["where"], "references": references_of(example),
                        "answers": rollout.completions[rows],
                        "rewards": [round(r, 4) for r in rollout.rewards[rows].tolist()],
                        "advantages": [round(a, 4) for a in rollout.advantages[rows].tolist()],
                        "injected": injected[0] if injected else None})
    return records


def format_group(record: dict) -> str:
    """One group as the console shows it: what the update pushes up (A > 0) and down (A < 0)."""
    lines = [f"  group of {record['where'].removeprefix(os.getcwd() + os.sep)}, reference: {record['references'][0]}",
             f"  {'reward':>7} {'advantage':>9}  answer"]
    for i, (answer, reward, advantage) in enumerate(zip(record["answers"], record["rewards"],
                                                        record["advantages"])):
        mark = "   <- the reference, injected (MP-GRPO)" if i == record["injected"] else ""
        lines.append(f"  {reward:>7.3f} {advantage:>+9.3f}  {answer}{mark}")
    return "\n".join(lines)


def write_lines(file, rows: list[dict]) -> None:
    for row in rows:
        file.write(json.dumps(row, ensure_ascii=False) + "\n")
    file.flush()


def memory_report(policy, base_model) -> str:
    """Parameters, trainable parameters, and the memory they need before any activations:
    weights (+ the frozen base model's copy), float32 gradients and AdamW's two moments."""
    count = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    copies = 2 if base_model is not None and base_model is not policy else 1
    weights = sum(p.numel() * p.element_size() for p in policy.parameters()) * copies
    gigabytes = (weights + trainable * 4 * 3) / 1e9
    return (f"model: {count / 1e6:.1f}M parameters, {trainable / 1e6:.1f}M trainable; weights"
            f"{' + reference' if copies == 2 else ''} + gradients + AdamW = {gigabytes:.2f} GB before activations")


def rouge_f1(hypothesis: str, reference: str, n: int | None) -> float:
    """ROUGE F1 on lower-cased words (punctuation dropped): F = 2 P R / (P + R) = 2 m / (|h| + |r|),
    P = m / |h|, R = m / |r|. ROUGE-N (n = 1, 2): m = shared n-grams (clipped counts), |h|, |r|
    = n-gram counts; ROUGE-L (n = None): m = longest common subsequence, |h|, |r| = words.
    (Written out here because none of this project's packages has ROUGE.)"""
    h, r = re.findall(r"\w+", hypothesis.lower()), re.findall(r"\w+", reference.lower())
    if n is None:
        row = [0] * (len(r) + 1)                    # LCS, one row of the table at a time
        for x in h:
            previous_diagonal = 0
            for j, y in enumerate(r, start=1):
                previous_diagonal, row[j] = row[j], (previous_diagonal + 1 if x == y
                                                     else max(row[j], row[j - 1]))
        matches = row[-1]
    else:
        h, r = ([tuple(words[i:i + n]) for i in range(len(words) - n + 1)] for words in (h, r))
        matches = sum((collections.Counter(h) & collections.Counter(r)).values())
    return 0.0 if matches == 0 else 2 * matches / (len(h) + len(r))


def rouge_rewards(completions: list[str], references: list[list[str]], n: int | None) -> torch.Tensor:
    """r_i = max over references of rouge_f1(completion_i, reference, n)."""
    return torch.tensor([max(rouge_f1(c, ref, n) for ref in refs)
                         for c, refs in zip(completions, references)])


REWARDS.update(rouge1=functools.partial(rouge_rewards, n=1), rouge2=functools.partial(rouge_rewards, n=2),
               rouge_l=functools.partial(rouge_rewards, n=None))


def corpus_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """sacrebleu's corpus BLEU, chrF and TER, ROUGE-1/2/L (mean sentence F1 x 100), their
    average ("avg", with 100 - TER so that higher is better) and WER, with BLEU's signature."""
    from sacrebleu.metrics import BLEU, CHRF, TER
    most = max(len(r) for r in references)
    # sacrebleu takes one stream per reference position; None marks "no n-th reference here".
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(most)]
    bleu = BLEU()
    scores = {"bleu": bleu.corpus_score(predictions, streams).score,
              "chrf": CHRF().corpus_score(predictions, streams).score,
              "ter": TER().corpus_score(predictions, streams).score}
    for name in ("rouge1", "rouge2", "rouge_l"):
        scores[name] = 100 * REWARDS[name](predictions, references).mean().item()
    higher_is_better = {**scores, "ter": 100 - scores["ter"]}
    scores["avg"] = sum(higher_is_better.values()) / len(higher_is_better)
    return {**scores, "wer": word_error_rate(predictions, references),
            "signature": str(bleu.get_signature())}


def edit_distance(hypothesis: list | str, reference: list | str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions (one row of
    the dynamic-programming table at a time)."""
    row = list(range(len(reference) + 1))
    for i, h in enumerate(hypothesis, start=1):
        previous_diagonal, row[0] = row[0], i
        for j, r in enumerate(reference, start=1):
            previous_diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1,
                                                    previous_diagonal + (h != r))
    return row[-1]


def word_error_rate(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus WER in %: word edits summed over lines / reference words summed over lines, on
    lower-cased words without punctuation, against each line's closest reference."""
    def words(text):
        return re.sub(r"[^\w\s']", " ", text.lower()).split()
    errors = total = 0
    for prediction, refs in zip(predictions, references):
        best = min((edit_distance(words(prediction), words(r)), len(words(r))) for r in refs)
        errors, total = errors + best[0], total + best[1]
    return 100.0 * errors / max(total, 1)


def replacement_audio(examples: list[dict], indices: list[int], kind: str) -> list[torch.Tensor] | None:
    """The listening checks: what the model hears instead of the clips of examples[i], i in
    indices. "silence": 1 s of zeros; "shuffled": the clip of the next example of the whole
    list (a wrong but real clip, whatever the batch size); "speech": None, their own clips."""
    if kind == "silence":
        return [torch.zeros(SAMPLING_RATE) for _ in indices]
    if kind == "shuffled":
        if len(examples) < 2:
            raise UsageError("--eval_audio shuffled needs at least 2 test clips (it plays each "
                             "example another example's clip)")
        others = [examples[(i + 1) % len(examples)] for i in indices]
        return [load_audio(ex["audio_path"], ex["where"]) for ex in others]
    return None


def evaluate_modes(model, processor, examples: list[dict], cfg: Config) -> dict:
    return {mode: evaluate(model, processor, examples, cfg, mode == "greedy", cfg.seed)
            for mode in ("sampled", "greedy")}


def write_predictions(path: Path, examples: list[dict], results: dict) -> None:
    """One line per test clip: references and every model's answers, to read what it says.
    The predictions then leave results.json, which keeps only the scores."""
    rows = []
    for index, example in enumerate(examples):
        row = {"where": example["where"], "references": references_of(example)}
        for when in ("before", "after", "best"):
            for mode in ("sampled", "greedy"):
                if "predictions" in results.get(when, {}).get(mode, {}):
                    row[f"{when}_{mode}"] = results[when][mode]["predictions"][index]
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_atomically(path, "".join(rows))
    for when in ("before", "after", "best"):
        for mode in ("sampled", "greedy"):
            results.get(when, {}).get(mode, {}).pop("predictions", None)


def timing_summary(timer: Timer, steps: int, train_seconds: float) -> dict:
    phases = {k: round(v, 2) for k, v in timer.seconds.items()}
    train_phases = {k: v for k, v in timer.seconds.items() if k != "eval"}
    total = sum(train_phases.values()) or 1.0
    return {"steps": steps, "seconds_per_step": round(train_seconds / max(steps, 1), 3),
            "train_seconds": round(train_seconds, 1), "phases_seconds": phases,
            "train_share": {k: round(v / total, 3) for k, v in train_phases.items()}}


def print_eval(label: str, evaluation: dict, examples: list[dict], count: int) -> None:
    print(f"\n[{label}]")
    for mode in ("sampled", "greedy"):
        e = evaluation[mode]
        print(f"  {mode:>7}: BLEU {e['bleu']:.2f}, chrF {e['chrf']:.2f}, TER {e['ter']:.2f}, ROUGE-1 "
              f"{e['rouge1']:.2f}, ROUGE-2 {e['rouge2']:.2f}, ROUGE-L {e['rouge_l']:.2f}, avg {e['avg']:.2f}, "
              f"WER {e['wer']:.1f}")
    for example, prediction in list(zip(examples, evaluation["greedy"]["predictions"]))[:count]:
        question = f"  Q: {example['question']}\n" if "question" in example else ""
        print(f"{question}  reference: {references_of(example)[0]}\n  greedy:    {prediction}")


def print_summary(results: dict, cfg: Config) -> None:
    rows = [("base", results["before"]), (f"+ {cfg.algo}", results["after"])]
    if "best" in results:
        rows.append((f"best, step {results['best']['step']}", results["best"]))
    print(f"\n{'model':<16} {'BLEU sampled':>13} {'BLEU greedy':>12} {'chrF sampled':>13} "
          f"{'chrF greedy':>12}")
    for name, evaluation in rows:
        if evaluation:
            print(f"{name:<16} {evaluation['sampled']['bleu']:>13.2f} {evaluation['greedy']['bleu']:>12.2f} "
                  f"{evaluation['sampled']['chrf']:>13.2f} {evaluation['greedy']['chrf']:>12.2f}")
    print(f"sacrebleu: {results['after']['sampled']['signature']}")
    timing = results["timing"]
    shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in
                       sorted(timing["train_share"].items(), key=lambda kv: -kv[1]))
    print(f"time: {timing['seconds_per_step']:.2f} s/step over {timing['steps']} steps ({shares}); "
          f"eval {timing['phases_seconds'].get('eval', 0):.0f} s")
    print(f"wrote {cfg.output_dir}/results.json, predictions.jsonl, metrics.jsonl, "
          f"completions.jsonl, final/")


# --- Command line ----------------------------------------------------------------------------
def parse_args(argv=None) -> tuple[Config, set[str]]:
    """The options, and the names of those given on the command line (--resume keeps the
    checkpoint's value of every other one)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    for f in dataclasses.fields(Config):
        name, help = f"--{f.name}", f.metadata["help"]
        if f.type in ("bool", bool):
            parser.add_argument(name, action="store_true", help=help)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            shown = f" (default: {f.default})" if f.default != "" else ""
            parser.add_argument(name, type=kind, default=f.default, help=help + shown)
    args = parser.parse_args(argv)
    given = {f.name for f in dataclasses.fields(Config)
             if any(a == f"--{f.name}" or a.startswith(f"--{f.name}=") for a in (argv or sys.argv[1:]))}
    return Config(**vars(args)), given


def main(argv=None) -> int:
    cfg = None
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)   # SIGTERM as Ctrl-C
    try:
        cfg = check_config(resume_config(*parse_args(argv)))
        train(cfg)
        if world() > 1:       # leave together: no process tears down gloo under a busy peer
            torch.distributed.barrier()
    except UsageError as error:
        if int(os.environ.get("RANK", 0)) == 0:           # once, not once per process
            print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 1
    except OSError as error:            # e.g. the disk filled while a log line was written
        print(f"stopped: cannot write {error.filename or 'the output'} ({error.strerror})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        final = cfg and (Path(cfg.output_dir) / "final").is_dir() and cfg.steps
        print("\nstopped: interrupted" + (" (the trained model is in final/)" if final else ""),
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
