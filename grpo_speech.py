"""GRPO for a speech-aware language model, in one file.

A minimal implementation of "Advancing Speech Understanding in Speech-Aware Language Models with
GRPO" (Elmakies et al., arXiv 2509.16990). A speech-aware LLM (speech encoder -> projector ->
LLM; Granite Speech here, as in the paper) answers open-ended speech tasks, and instead of
supervised fine-tuning (SFT) it is trained with Group Relative Policy Optimization: sample a
group of G answers per prompt, score each with sentence BLEU against the reference, and push up
the answers that beat their group's average. MP-GRPO puts the reference itself into each group
as an off-policy sample.

    python grpo_speech.py --task ast                  # toy En->De speech translation, CPU
    python grpo_speech.py --task sqa --algo mp_grpo   # toy spoken QA with Mixed-Policy GRPO
    python grpo_speech.py --task ast --algo sft       # the SFT baseline, same data and budget
    python grpo_speech.py --help

The file reads top to bottom in the order data flows:

    0. Config         every option, with the paper's names and defaults
    1. Data           JSONL manifests, audio loading, prompts
    2. Model          Granite Speech from transformers (a real checkpoint's LoRA adapter
                      merged at load), an optional new LoRA to train (--lora_rank); audio
                      encoded once per prompt
    3. Sampling       a group of G completions per prompt (the rollout)
    4. Reward         sentence BLEU (and chrF, TER, ROUGE-1/2/L) in [0, 1]
    5. Advantages     A_i = (r_i - mean(r)) / (std(r) + eps) within each group
    6. Loss           token log-probs, the clipped GRPO objective with a k3 KL penalty, and
                      its normaliser, counted over the whole batch (all micro-batches, processes)
    7. MP-GRPO        inject the ground-truth answer into each group, off-policy
    8. Evaluation     corpus BLEU, chrF, TER (sacrebleu), ROUGE, their average and WER,
                      sampled and greedy
    9. Training loop  torchrun helpers, GRPO / MP-GRPO / SFT steps, checkpoints and resume,
                      dev evaluation (--eval_every), metrics, timing
   10. CLI            argument parsing and the summary table

Sections 4-7 are pure functions over tensors (no globals): each can be copied into another
trainer alone. Shapes use B = sequences, P = prompts, G = group size, T = completion tokens,
L = prompt tokens, V = vocabulary.
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
# 0. Config
# =============================================================================================
def option(default, help: str):
    """A config field whose help text becomes the --help line of its command-line flag."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every option of a run; `python grpo_speech.py --help` lists them with these texts."""
    # --- what to train ---
    task: str = option("ast", "ast (speech translation En->De), sqa (spoken question answering) "
                       "or asr (transcription; manifests default to data/ast/*, scored by WER too)")
    algo: str = option("grpo",
        "grpo, mp_grpo (reference injected into each group) or sft (the supervised baseline)")
    model: str = option(str(DATA_DIR / "granite-speech-tiny"),
        "checkpoint directory or hub id (e.g. ibm-granite/granite-speech-3.3-2b)")
    train: str = option("", "training manifest (JSONL); default data/<task>/train.jsonl")
    test: str = option("", "evaluation manifest (JSONL); default data/<task>/test.jsonl")
    output_dir: str = option("",
        "where metrics, checkpoints and the final model go; default runs/<task>-<algo>-seed<seed>")
    reward: str = option("bleu", "reward metric: bleu, chrf, ter, rouge1, rouge2 or rouge_l (paper: bleu)")
    # --- GRPO (paper section 3) ---
    group_size: int = option(8, "G, completions sampled per prompt (paper: 8)")
    beta: float = option(0.02, "weight of the KL penalty to the reference model (paper: 0.02)")
    eps: float = option(0.2, "PPO clip range: ratios outside [1-eps, 1+eps] get no gradient")
    eps_high: float = option(-1.0,
        "upper clip range if different from eps (DAPO's clip-higher); -1 = eps")
    loss_type: str = option("dapo",
        "token aggregation: dapo (paper), grpo (per-sequence mean) or dr_grpo")
    scale_rewards: str = option("group",
        "advantage scaling: group std (paper), batch std, or none (Dr. GRPO)")
    num_iterations: int = option(1,
        "policy updates per sampled batch (mu); 1 makes the ratio exactly 1")
    temperature: float = option(1.0, "sampling temperature during training (paper: 1.0)")
    max_completion_length: int = option(48,
        "most tokens sampled per answer (paper: 200; toy answers are short)")
    policy_shaping: float = option(0.0,
        "MP-GRPO: LUFFY's shaping f(p) = p / (p + gamma) on off-policy tokens; 0 = off (paper)")
    # --- optimisation ---
    steps: int = option(-1, "optimizer steps; -1 = the task's default (ast 400, sqa and asr 200); "
                            "0 = only evaluate --model on --test")
    batch_size: int = option(4, "prompts per step (each sampled G times)")
    sft_batch_size: int = option(0,
        "SFT examples per step; 0 = batch_size * group_size, the sequences of one GRPO step")
    lr: float = option(5e-5, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.05, "share of steps with linear learning-rate warm-up")
    lr_scheduler: str = option("constant_with_warmup",
        "any transformers scheduler name (constant_with_warmup, cosine, linear)")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 = no clipping")
    micro_batch_size: int = option(0, "sequences per forward/backward pass (memory): gradients "
        "accumulate over the step, normalised exactly as in one pass; 0 = all at once")
    gradient_checkpointing: bool = option(False, "recompute the LLM's activations in the "
                                          "backward pass: less memory, more time")
    lora_rank: int = option(0, "0: train the whole LLM (the paper); r > 0: train a new LoRA of rank r "
        "on the LLM's linear layers instead, the KL reference being the LoRA switched off (no "
        "model copy: fits the 8B on one 80 GB GPU)")
    train_projector: bool = option(False,
        "SFT only: also train the projector (the speech encoder is always frozen)")
    # --- evaluation (paper: sampling with top-p 0.9, temperature 0.9) ---
    eval_temperature: float = option(0.9, "sampling temperature for evaluation")
    eval_top_p: float = option(0.9, "nucleus sampling top-p for evaluation")
    eval_batch_size: int = option(50, "clips per evaluation batch")
    eval_limit: int = option(0, "evaluate on the first N test clips only; 0 = all")
    skip_base_eval: bool = option(False, "do not evaluate the model before training")
    eval_every: int = option(0, "score --dev (greedy BLEU) every N steps and keep the best "
                             "model in best/, tested at the end beside the last; 0 = off")
    dev: str = option("", "validation manifest for --eval_every; default data/<task>/dev.jsonl")
    dev_limit: int = option(100, "first N dev clips only (speed); 0 = all")
    eval_audio: str = option("speech",
        "what the model hears in evaluation: speech, or silence / shuffled (another clip) to "
        "check that it listens")
    # --- running ---
    seed: int = option(0, "seed for data order, sampling and initialisation")
    device: str = option("auto", "cpu, cuda or auto")
    dtype: str = option("float32", "float32 or bfloat16 (weights and compute; TF32 on GPUs)")
    save_dtype: str = option("auto",
        "dtype of the saved final model: auto (as trained), float32 or bfloat16")
    threads: int = option(0, "torch CPU threads; 0 = all cores")
    log_every: int = option(10, "print a metrics line every N steps")
    save_every: int = option(0, "write a resumable checkpoint every N steps; 0 = none (final/ "
                             "is always written)")
    keep_checkpoints: int = option(2, "how many step checkpoints to keep")
    resume: str = option("",
        "continue from a checkpoint directory, or 'last' for the newest in output_dir; the "
        "run's other options come from the checkpoint unless given again")
    overwrite_output_dir: bool = option(False,
        "start afresh in an output_dir that holds another run's files (they are deleted)")
    examples: int = option(3, "example predictions to print after evaluation")
    trust_remote_code: bool = option(False,
        "allow a checkpoint's own Python code (off: only transformers' classes run)")


CHOICES = {"task": ("ast", "sqa", "asr"), "algo": ("grpo", "mp_grpo", "sft"),
           "eval_audio": ("speech", "silence", "shuffled"),
           "loss_type": ("dapo", "grpo", "dr_grpo"), "scale_rewards": ("group", "batch", "none"),
           "device": ("auto", "cpu", "cuda"), "dtype": ("float32", "bfloat16"),
           "save_dtype": ("auto", "float32", "bfloat16")}


class UsageError(ValueError):
    """A bad option or input file: reported as one line, without a traceback."""


def check_config(cfg: Config) -> Config:
    """Reject bad options before any model is loaded; fill in the defaults that depend on others."""
    for name, allowed in {**CHOICES, "reward": tuple(REWARDS)}.items():
        if getattr(cfg, name) not in allowed:
            raise UsageError(f"unknown --{name} {getattr(cfg, name)!r}: choose one of "
                             f"{', '.join(allowed)}")
    if cfg.algo != "sft" and cfg.group_size < 2:
        raise UsageError(f"--group_size {cfg.group_size}: GRPO compares answers within a group, it needs at least 2")
    if cfg.algo != "sft" and cfg.train_projector:
        raise UsageError("--train_projector works with --algo sft only: GRPO encodes each clip once, without gradients")
    for name in ("batch_size", "eval_batch_size", "max_completion_length", "num_iterations",
                 "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("sft_batch_size", "eval_limit", "micro_batch_size", "lora_rank",
                 "save_every", "log_every", "examples", "eval_every", "dev_limit", "threads", "lr",
                 "weight_decay", "beta", "max_grad_norm", "policy_shaping"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
    # Below temperature 0.1 a group's answers are all the same: no advantage, no training.
    for name, inside, allowed in (
            ("eps", 0 < cfg.eps < 1, "0 < eps < 1"),
            ("eps_high", cfg.eps_high == -1 or 0 < cfg.eps_high < 10, "-1 (= eps) or in (0, 10)"),
            ("eval_top_p", 0 < cfg.eval_top_p <= 1, "0 < eval_top_p <= 1"),
            ("warmup_ratio", 0 <= cfg.warmup_ratio <= 1, "0 <= warmup_ratio <= 1"),
            ("temperature", 0.1 <= cfg.temperature <= 10, "0.1 <= temperature <= 10"),
            ("eval_temperature", 0.1 <= cfg.eval_temperature <= 10, "0.1 <= eval_temperature <= 10")):
        if not inside:
            raise UsageError(f"--{name} {getattr(cfg, name)}: need {allowed}")
    from transformers import SchedulerType
    if cfg.lr_scheduler not in [kind.value for kind in SchedulerType]:
        raise UsageError(f"unknown --lr_scheduler {cfg.lr_scheduler!r}: choose one of "
                         f"{', '.join(kind.value for kind in SchedulerType)}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch")
    if cfg.steps < -1:
        raise UsageError(f"--steps must be at least 0 (or -1, the task's default), got {cfg.steps}")
    # The toy AST base needs twice the steps to learn the data set's style (README, results).
    cfg.steps = TASKS[cfg.task]["steps"] if cfg.steps == -1 else cfg.steps
    cfg.sft_batch_size = cfg.sft_batch_size or cfg.batch_size * cfg.group_size
    if cfg.eps_high < 0:
        cfg.eps_high = cfg.eps
    toy = DATA_DIR / ("ast" if cfg.task == "asr" else cfg.task)   # AST clips have transcripts
    cfg.train = cfg.train or str(toy / "train.jsonl")
    cfg.test = cfg.test or str(toy / "test.jsonl")
    cfg.dev = cfg.dev or str(toy / "dev.jsonl")
    cfg.output_dir = cfg.output_dir or str(ROOT / "runs" / f"{cfg.task}-{cfg.algo}-seed{cfg.seed}")
    needed = ["test"]                             # --steps 0 only evaluates
    if cfg.steps:
        needed = ["train", "test"] + (["dev"] if cfg.eval_every else [])
    for name in needed:
        if not Path(getattr(cfg, name)).is_file():
            raise UsageError(f"--{name} {getattr(cfg, name)}: manifest file not found")
    model = Path(cfg.model).expanduser()
    # "runs/x/final" with a typo is a path, not the hub id "runs/x": its first part exists here.
    if not model.is_dir() and (not re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.model)
                               or Path(model.parts[0]).exists()):
        raise UsageError(f"--model {cfg.model}: no such checkpoint directory (nor a hub id like org/name)")
    return cfg


# =============================================================================================
# 1. Data: manifests, audio, prompts
# =============================================================================================
# A manifest is JSONL, one example per line (data/README.md): "audio" (path relative to the
# manifest), the task's text fields, and optionally "task" to mix tasks in one file (used for the
# toy base model's pretraining mix). The prompts are the paper's.
TASKS = {
    "ast": {"prompt": "<|audio|> listen to the speech and translate it into German.",
            "fields": ("translation",), "references": lambda ex: ex["translation"], "steps": 400},
    "sqa": {"prompt": "Listen to the audio <|audio|> and answer the following question: {question}",
            "fields": ("question", "answer"), "references": lambda ex: ex["answer"], "steps": 200},
    "asr": {"prompt": "<|audio|>can you transcribe the speech into a written format?",
            "fields": ("text",), "references": lambda ex: [ex["text"]], "steps": 200},
}
SAMPLING_RATE = 16_000
MAX_AUDIO_SECONDS = 60.0
MIN_AUDIO_SECONDS = 0.05


def load_manifest(path: str | Path, default_task: str) -> list[dict]:
    """Read and check a JSONL manifest. Each error names the file and line."""
    path = Path(path)
    examples = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()    # -sig: a BOM is fine
    except UnicodeDecodeError as error:
        line = path.read_bytes()[:error.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text; save the manifest as UTF-8") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
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
            if not all(isinstance(v, str) for v in (value if many and isinstance(value, list) else [value])):
                kind = "a string or a list of strings" if many else "a string"
                raise UsageError(f"{where}: {name!r} must be {kind}, got {json.dumps(value)[:40]}")
            if name in ("audio", "question") + TASKS[task]["fields"] and name in example and not all(
                    v.strip() for v in (value if isinstance(value, list) else [value])):
                raise UsageError(f"{where}: empty {'reference text' if many else name}")
        example["audio_path"] = str((path.parent / example["audio"]).resolve())
        example["where"] = where
        examples.append(example)
    if not examples:
        raise UsageError(f"{path}: manifest has no examples")
    return examples


def ensure_audio(examples: list[dict]) -> None:
    """Check that every clip exists and that its header is readable and of a usable length,
    before any model loads (a bad clip on line 24 must not stop a run after hours). The bundled
    toy data is synthesized on first use (its manifests carry eSpeak NG recipes, see
    data/make_data.py); a user's missing file is an error."""
    missing = [ex for ex in examples if not os.path.isfile(ex["audio_path"])]
    toy = [ex for ex in missing if Path(ex["audio_path"]).is_relative_to(DATA_DIR)]
    if toy:
        subprocess.run([sys.executable, str(DATA_DIR / "make_data.py"), "--synthesize"], check=True)
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


def check_duration(seconds: float, path: str, where: str) -> None:
    if seconds > MAX_AUDIO_SECONDS:
        raise UsageError(f"{where}: audio is {seconds:.0f} s long, more than the "
                         f"{MAX_AUDIO_SECONDS:.0f} s this script accepts; split it")
    if seconds < MIN_AUDIO_SECONDS:     # too short for a word (and for the mel's padding)
        raise UsageError(f"{where}: audio {path} is {1000 * seconds:.0f} ms long, shorter than "
                         f"{1000 * MIN_AUDIO_SECONDS:.0f} ms")


def load_audio(path: str, where: str = "") -> torch.Tensor:
    """Mono float32 waveform at 16 kHz, shape (samples,).

    Files are read with soundfile (libsndfile: WAV of any sample format, FLAC, MP3, OGG), which
    needs no FFmpeg, unlike torchaudio.load. Stereo is averaged to mono, other sample rates are
    resampled with torchaudio, and clips longer than MAX_AUDIO_SECONDS are an error rather than
    silently truncated (the encoder has no hard limit, but memory and the LLM's context do).
    """
    import soundfile
    where = where or path
    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)   # (samples, channels)
    except Exception as error:                         # unreadable, truncated, not audio at all
        raise UsageError(f"{where}: cannot read audio {path} ({error})") from None
    if data.size == 0:
        raise UsageError(f"{where}: audio {path} has no samples")
    check_duration(len(data) / rate, path, where)
    samples = torch.from_numpy(data).mean(dim=1)       # (samples, channels) -> (samples,)
    if rate != SAMPLING_RATE:
        import torchaudio
        samples = torchaudio.functional.resample(samples, rate, SAMPLING_RATE)
    return samples


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
    audio_mask: torch.Tensor           # (P, audio tokens): which projector outputs are real

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


# =============================================================================================
# 2. Model: Granite Speech from transformers
# =============================================================================================
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
    # Its warning that peft is missing does not apply: the adapter is merged below.
    logging.getLogger("transformers.models.granite_speech.modeling_granite_speech").setLevel(logging.ERROR)
    model = GraniteSpeechForConditionalGeneration.from_pretrained(
        cfg.model, dtype=dtype, use_safetensors=True, **options).to(device)
    if getattr(model, "_hf_peft_config_loaded", False):
        raise UsageError("peft is installed, so transformers loaded the checkpoint's LoRA adapter "
                         "itself and cannot switch it on with this peft; uninstall peft (the "
                         "adapter is merged into the weights here instead)")
    if model.config.has_lora_adapter:
        merge_audio_adapter(model, cfg.model)
    model.eval()
    # What trains: the whole LLM, or only a new LoRA on it; never the speech encoder.
    model.model.language_model.requires_grad_(not cfg.lora_rank)
    model.lm_head.requires_grad_(not cfg.lora_rank)
    if cfg.lora_rank:
        add_lora(model.model.language_model, cfg.lora_rank)
    model.model.encoder.requires_grad_(False)
    model.model.projector.requires_grad_(cfg.train_projector)
    if cfg.gradient_checkpointing:
        model.model.language_model.activation_checkpointing_enable()
    return processor, model


def merge_audio_adapter(model, checkpoint: str) -> None:
    """The real checkpoints ship a LoRA adapter on the LLM that is on for every prompt with
    audio, that is every prompt here. Merge it into the weights once, W <- W + (alpha / r) B A:
    the LLM then trains as a plain model and saves a plain checkpoint (has_lora_adapter false)
    that reloads exactly, and peft is not needed."""
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
    enabled = False it is the base layer again: GRPO's reference model, without a copy."""
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
    """Speech encoder + projector, once per prompt, each clip alone: (P, audio tokens, hidden).

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
        embeds.append(projector(hidden)[0])                             # (audio tokens, H)
    return torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)    # (P, A, H)


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


# =============================================================================================
# 3. Sampling: a group of G completions per prompt
# =============================================================================================
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


# =============================================================================================
# 4. Reward: text similarity to the reference(s), in [0, 1]
# =============================================================================================
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


REWARDS = {"bleu": bleu_rewards, "chrf": chrf_rewards, "ter": ter_rewards,
           "rouge1": functools.partial(rouge_rewards, n=1), "rouge2": functools.partial(rouge_rewards, n=2),
           "rouge_l": functools.partial(rouge_rewards, n=None)}


# =============================================================================================
# 5. Advantages: each answer against its own group
# =============================================================================================
def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    rewards: (P * G,), grouped: rows p*G .. p*G + G-1 belong to prompt p -> advantages (P * G,)
    scale: "group" (the paper; TRL's default) divides by the group's std, "batch" by the std of
    all rewards in the batch, "none" only centres (Dr. GRPO: no difficulty re-weighting).
    std is the sample std (Bessel's correction, n - 1), as TRL computes it, so the numbers match
    what users see there. A group whose rewards are all equal carries no signal: its advantages
    are exactly 0 (0 / (0 + eps)), never NaN.
    """
    if group_size < 2:
        raise ValueError("group_advantages needs group_size >= 2")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)                      # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)       # (P, G)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}")
    return centred.reshape(-1)


# =============================================================================================
# 6. Loss: token log-probs, clipped objective, KL penalty
# =============================================================================================
def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
    """log pi(o_t | q, o_<t) of the sampled tokens, per token.

    logits: (B, T, V) predicting tokens (B, T); mask (B, T) zeroes padding -> (B, T)
    Computed as log_softmax + gather (stable for any logit size). Logits are divided by the
    sampling temperature first, so the log-probs are those of the distribution that was sampled.
    """
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    token_log_probs = log_probs.gather(dim=-1, index=tokens.unsqueeze(-1)).squeeze(-1)
    return token_log_probs if mask is None else torch.where(mask.bool(), token_log_probs, 0.0)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, eps: float = 0.2, beta: float = 0.02,
              loss_type: str = "dapo", off_policy: torch.Tensor | None = None,
              eps_high: float | None = None, policy_shaping: float = 0.0,
              max_completion_length: int | None = None,
              normalizer: float | None = None) -> tuple[torch.Tensor, dict]:
    """The (MP-)GRPO objective of the paper, as a loss to minimise.

        s_it = pi_theta(o_it) / pi_old(o_it) = exp(logp - old_logp)
        l_it = min(s_it A_i, clip(s_it, 1 - eps, 1 + eps_high) A_i)             on-policy rows
        l_it = f(pi_theta(o_it)) A_i,  f(p) = p (or p / (p + gamma) if shaping)   off-policy rows
        KL_it = exp(ref - logp) - (ref - logp) - 1                                 (k3 estimator)
        loss  = -aggregate_it(l_it - beta KL_it)

    Off-policy rows (MP-GRPO) hold the ground-truth answer: their behaviour policy pi_phi is
    taken as 1, so the importance weight is pi_theta itself and is not clipped (LUFFY).
    aggregate: "dapo" (paper) sums over every completion token of the batch and divides by their
    number; "grpo" averages each sequence, then the sequences; "dr_grpo" divides the sum by
    B * max_completion_length (default T). `normalizer` is that divisor for the WHOLE batch
    (loss_normalizer of all its rows): pass it when these rows are a part of the batch (a
    micro-batch, one process's share), so that the parts' losses add up to the batch's loss;
    None computes it from these rows alone.

    logp, old_logp, ref_logp, mask: (B, T); advantages: (B,); off_policy: (B,) bool or None.
    Returns (loss, diagnostics): mean ratio and clip fraction over on-policy tokens, mean KL.

    With one update per batch, old_logp is logp.detach(): s = 1 exactly, nothing is clipped,
    and the gradient is REINFORCE with a group baseline, -sum_it A_i grad logp_it / N.
    """
    eps_high = eps if eps_high is None else eps_high
    keep = mask.bool()
    mask = mask.float()
    # Padding may hold anything (even inf or NaN): zero it before exp, so that neither the loss
    # nor its gradient can see it (0 * inf would be NaN).
    logp = torch.where(keep, logp, 0.0)
    old_logp = torch.where(keep, old_logp, 0.0)
    ref_logp = None if ref_logp is None else torch.where(keep, ref_logp, 0.0)
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
    if beta > 0 and ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1                              # >= 0, unbiased for KL
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


def loss_normalizer(loss_type: str, mask: torch.Tensor, max_completion_length: int | None = None) -> float:
    """The divisor of grpo_loss's token sum for rows `mask` (B, T): "dapo" the number of
    completion tokens, "grpo" the number of sequences (each already divided by its length),
    "dr_grpo" B * max_completion_length (default T). Sum it over micro-batches and processes to
    get the whole batch's; it is a sum, so it adds up."""
    if loss_type == "dapo":
        return max(mask.sum().item(), 1.0)
    if loss_type == "grpo":
        return float(mask.shape[0])
    if loss_type == "dr_grpo":
        return float(mask.shape[0] * (max_completion_length or mask.shape[1]))
    raise ValueError(f"unknown loss_type {loss_type!r}")


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
    """Cross-entropy of the reference tokens, averaged over tokens: -sum_it logp_it / N, with N
    the whole batch's token count (`normalizer`; None: these rows' own)."""
    return -(logp * mask).sum() / (mask.sum().clamp(min=1) if normalizer is None else normalizer)


# =============================================================================================
# 7. MP-GRPO: the ground truth as one member of each group
# =============================================================================================
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


def answer_ids(tokenizer, texts: list[str], eos_token_id: int) -> list[torch.Tensor]:
    """Token ids of reference answers followed by EOS, as the model would have to produce them."""
    return [torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_token_id])
            for text in texts]


# =============================================================================================
# 8. Evaluation: corpus BLEU, chrF, TER, ROUGE and WER on the test manifest
# =============================================================================================
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


def replacement_audio(examples: list[dict], kind: str) -> list[torch.Tensor] | None:
    """The listening checks: what the model hears instead of each example's own clip.
    "silence": 1 s of zeros; "shuffled": the clip of the next example (a wrong but real clip);
    "speech": None, the examples' own clips."""
    if kind == "silence":
        return [torch.zeros(SAMPLING_RATE) for _ in examples]
    if kind == "shuffled":
        return [load_audio(ex["audio_path"], ex["where"]) for ex in examples[1:] + examples[:1]]
    return None


@torch.no_grad()
def evaluate(model, processor, examples: list[dict], cfg: Config, greedy: bool, seed: int) -> dict:
    """Answer every test clip once (sampled with top-p/temperature as in the paper, or greedy)
    and score the corpus: sacrebleu's BLEU, chrF and TER, ROUGE-1/2/L (mean sentence F1 x 100),
    their average ("avg", with 100 - TER so that higher is better, as in the paper's reward
    ablation) and WER. The RNG is forked: evaluating does not change the training run's random
    stream. Each clip is encoded alone, so the scores do not depend on --eval_batch_size."""
    from sacrebleu.metrics import BLEU, CHRF, TER
    from tqdm import tqdm
    model.eval()
    predictions = []
    device = next(model.parameters()).device
    shard = examples[rank()::world()]              # under torchrun each process answers a share
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + rank())
        for start in tqdm(range(0, len(shard), cfg.eval_batch_size), leave=False, disable=rank() > 0,
                          desc="eval greedy" if greedy else "eval sampled", file=sys.stderr):
            chunk = shard[start:start + cfg.eval_batch_size]
            batch = make_batch(chunk, processor, device, replacement_audio(chunk, cfg.eval_audio))
            ids = sample(model, batch, encode_audio(model, batch), 1, cfg.max_completion_length,
                         cfg.eval_temperature, cfg.eval_top_p, greedy=greedy)
            mask = completion_mask(ids, model.config.text_config.eos_token_id)
            predictions += decode(processor.tokenizer, ids, mask)
    shards = all_gather(predictions)
    predictions = [shards[i % world()][i // world()] for i in range(len(examples))]
    references = [references_of(ex) for ex in examples]
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
            "signature": str(bleu.get_signature()), "predictions": predictions}


# =============================================================================================
# 9. Training loop
# =============================================================================================
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


def grpo_step(cfg, policy, reference, processor, optimizer, batch: Batch, timer: Timer) -> dict:
    """One GRPO (or MP-GRPO) step on P prompts: sample, score, normalise, update."""
    tokenizer = processor.tokenizer
    eos = policy.config.text_config.eos_token_id
    G = cfg.group_size
    # 1. Rollout: encode each clip once, sample G answers per prompt from the current policy.
    with timer("rollout"):
        policy.eval()
        with torch.no_grad():
            audio_embeds = encode_audio(policy, batch)                          # (P, A, H)
        completion_ids = sample(policy, batch, audio_embeds, G, cfg.max_completion_length,
                                cfg.temperature)                                # (P*G, T)
        mask = completion_mask(completion_ids, eos)                             # (P*G, T)
        off_policy = None
        if cfg.algo == "mp_grpo":
            refs = [references_of(ex)[0] for ex in batch.examples]
            completion_ids, mask, off_policy = inject_reference(
                completion_ids, mask, answer_ids(tokenizer, refs, eos), G,
                policy.config.text_config.pad_token_id)
        completions = decode(tokenizer, completion_ids, mask)
    # 2. Reward and group-relative advantages.
    with timer("reward"):
        references = [refs for refs in batch.references for _ in range(G)]
        rewards = REWARDS[cfg.reward](completions, references)                  # (P*G,)
        advantages = group_advantages(rewards, G, cfg.scale_rewards).to(mask.device)
    # Every row of a prompt shares its prompt and audio: repeat them G times.
    prompt_ids = batch.input_ids.repeat_interleave(G, dim=0)
    prompt_mask = batch.attention_mask.repeat_interleave(G, dim=0)
    audio_rows = audio_embeds.repeat_interleave(G, dim=0)
    audio_mask = batch.audio_mask.repeat_interleave(G, dim=0)
    forward = (prompt_ids, prompt_mask, audio_rows, audio_mask, completion_ids)
    # Log-probs in micro-batches of rows (--micro_batch_size): the same numbers, less memory.
    rows_per_pass = cfg.micro_batch_size or len(mask)
    parts = [slice(i, i + rows_per_pass) for i in range(0, len(mask), rows_per_pass)]
    tokens, sequences = all_sum(mask.sum().item()), all_sum(len(mask))    # of the global batch
    # The loss divides by the whole global batch's normaliser, so micro-batches and processes add up.
    normalizer = all_sum(loss_normalizer(cfg.loss_type, mask, cfg.max_completion_length))
    terms = dict(eps=cfg.eps, beta=cfg.beta, loss_type=cfg.loss_type, eps_high=cfg.eps_high,
                 policy_shaping=cfg.policy_shaping, max_completion_length=cfg.max_completion_length,
                 normalizer=normalizer)

    def log_probs(model, rows):
        return token_log_probs(completion_logits(model, *(x[rows] for x in forward)),
                               completion_ids[rows], mask[rows], cfg.temperature)
    # 3. Reference log-probs, only when the KL term is on.
    ref_logp = None
    if cfg.beta > 0:
        with timer("reference"), torch.no_grad(), lora_off(reference):
            ref_logp = torch.cat([log_probs(reference, rows) for rows in parts])
    # 4. Policy update(s). With num_iterations == 1 the old policy is the current one.
    set_train_mode(policy, cfg.train_projector)
    old_logp = None
    for _ in range(cfg.num_iterations):
        new_logp = []
        for rows in parts:
            with timer("forward"):
                logp = log_probs(policy, rows)
                old = logp.detach() if old_logp is None else old_logp[rows]
                part = [None if x is None else x[rows] for x in (ref_logp, off_policy)]
                loss, _ = grpo_loss(logp, old, part[0], advantages[rows], mask[rows],
                                    off_policy=part[1], **terms)
            backward(loss, timer)
            new_logp.append(logp.detach())
        old_logp = torch.cat(new_logp) if old_logp is None else old_logp
        with torch.no_grad():           # the whole batch's loss and diagnostics, for the log
            loss, diagnostics = grpo_loss(torch.cat(new_logp), old_logp, ref_logp, advantages, mask,
                                          off_policy=off_policy, **terms)
        grad_norm = optimizer_step(policy, optimizer, cfg.max_grad_norm, timer)
    # Logged over the global batch: sums over processes (the values themselves in one process).
    on_policy = (rewards if off_policy is None else rewards[~off_policy.cpu()]).double()
    n, total = all_sum(len(on_policy)), all_sum(on_policy.sum().item())
    spread = all_sum(((on_policy - total / n) ** 2).sum().item())
    return {"loss": all_sum(loss.item()), "reward": total / n,
            "reward_std": (spread / max(n - 1, 1)) ** 0.5, "grad_norm": grad_norm.item(),
            "completion_tokens": tokens / sequences,
            "zero_std_groups": all_sum((rewards.view(-1, G).std(dim=1) == 0).sum().item()) / all_sum(len(rewards) // G),
            **{k: all_sum(v * mask.sum().item() / tokens) for k, v in diagnostics.items()}}


def sft_step(cfg, policy, processor, optimizer, batch: Batch, timer: Timer, rng: random.Random) -> dict:
    """One supervised step: maximise the log-likelihood of one reference answer per example."""
    eos = policy.config.text_config.eos_token_id
    pad = policy.config.text_config.pad_token_id
    set_train_mode(policy, cfg.train_projector)
    targets = answer_ids(processor.tokenizer, [rng.choice(r) for r in batch.references], eos)
    target_ids = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True,
                                                 padding_value=pad).to(batch.input_ids.device)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(t)) for t in targets],
                                           batch_first=True).to(batch.input_ids.device)
    total, rows_per_pass = 0.0, cfg.micro_batch_size or len(targets)
    tokens = all_sum(mask.sum().item())                                  # of the global batch
    for rows in [slice(i, i + rows_per_pass) for i in range(0, len(targets), rows_per_pass)]:
        with timer("forward"):
            with torch.set_grad_enabled(cfg.train_projector):
                audio_embeds = encode_audio(policy, dataclasses.replace(
                    batch, input_features=batch.input_features[rows]))         # (rows, A', H)
            width = batch.audio_mask.shape[1] - audio_embeds.shape[1]     # pad to the batch's A
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


def save_model(model, processor, directory: Path, save_dtype: str = "auto") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if save_dtype in ("float32", "bfloat16"):
        model = copy.deepcopy(model).to(getattr(torch, save_dtype))
    model.save_pretrained(directory, state_dict=plain_state_dict(model), safe_serialization=True)
    processor.save_pretrained(directory)
    umask = os.umask(0)
    os.umask(umask)
    for file in directory.iterdir():    # safetensors writes 0600; make it like the other files
        file.chmod(0o666 & ~umask)


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
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(policy, processor, tmp)
    if cfg.lora_rank:           # to resume: the LoRA itself, not only the merged model
        from safetensors.torch import save_file
        save_file({n: p.detach().contiguous() for n, p in policy.named_parameters() if p.requires_grad},
                  tmp / "trainable.safetensors")
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng}
    torch.save(state, tmp / "trainer_state.pt")
    (tmp / "run.json").write_text(json.dumps({"step": step, "config": dataclasses.asdict(cfg)}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(output_dir)[:-cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return final


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


RUN_FILES = ("metrics.jsonl", "results.json", "base_eval.json", "predictions.jsonl", "final", "best")


def prepare_output_dir(cfg: Config) -> Path:
    """A fresh run never mixes with, or silently deletes, another run's files; and it fails
    now, not after an hour of training, if its results cannot be written."""
    output_dir = Path(cfg.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / ".write-test").write_text("")
        (output_dir / ".write-test").unlink()
    except OSError as error:
        raise UsageError(f"--output_dir {output_dir}: cannot write there ({error.strerror})") from None
    old = [p for p in output_dir.iterdir() if p.name in RUN_FILES] + checkpoints(output_dir)
    if old and not cfg.resume:
        if not cfg.overwrite_output_dir:
            raise UsageError(f"--output_dir {output_dir} holds another run's files "
                             f"({', '.join(sorted(p.name for p in old)[:3])}, ...): continue it with "
                             f"--resume last, replace it with --overwrite_output_dir, or choose "
                             f"another --output_dir")
        for path in old:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return output_dir


def evaluate_modes(model, processor, examples: list[dict], cfg: Config) -> dict:
    return {mode: evaluate(model, processor, examples, cfg, mode == "greedy", cfg.seed)
            for mode in ("sampled", "greedy")}


def load_trainable(checkpoint: Path) -> dict:
    """A LoRA run's trainable weights (trainable.safetensors), to put back on the base model."""
    from safetensors.torch import load_file
    try:
        return load_file(checkpoint / "trainable.safetensors")
    except Exception as error:
        raise damaged(checkpoint, "trainable.safetensors", error) from None


def restore(checkpoint: Path, optimizer, scheduler, output_dir: Path) -> tuple[int, float]:
    """Optimizer, scheduler and RNG states of a checkpoint; the metrics of later steps are
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
    metrics_path = output_dir / "metrics.jsonl"
    kept = [row for row in map(json_or_none, metrics_path.read_text().splitlines())
            if row and row.get("step", state["step"] + 1) <= state["step"]] if metrics_path.is_file() else []
    if rank() == 0:
        metrics_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
    print(f"resuming from {checkpoint} at step {state['step']}")
    return state["step"], kept[-1]["seconds"] if kept else 0.0


def memory_report(policy, reference) -> str:
    """Parameters, trainable parameters, and the memory they need before any activations:
    weights (+ the frozen reference copy), float32 gradients and AdamW's two moments."""
    count = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    copies = 2 if reference is not None and reference is not policy else 1
    weights = sum(p.numel() * p.element_size() for p in policy.parameters()) * copies
    gigabytes = (weights + trainable * 4 * 3) / 1e9
    return (f"model: {count / 1e6:.1f}M parameters, {trainable / 1e6:.1f}M trainable; weights"
            f"{' + reference' if copies == 2 else ''} + gradients + AdamW = {gigabytes:.2f} GB before activations")


def keep_best(policy, processor, step: int, dev_bleu: float, output_dir: Path) -> None:
    """best/ holds the model of the step with the highest dev score so far (the paper's
    "best checkpoint on validation"); best/best.json says which step."""
    record = output_dir / "best" / "best.json"
    if record.is_file() and json.loads(record.read_text())["dev_bleu"] >= dev_bleu:
        return
    save_model(policy, processor, output_dir / "best")
    record.write_text(json.dumps({"step": step, "dev_bleu": dev_bleu}))


def train(cfg: Config) -> dict:
    """Evaluate the base model, train, evaluate again; write metrics, model and results."""
    from tqdm import tqdm
    from transformers import get_scheduler
    device = setup_device(cfg)
    is_main = rank() == 0                  # under torchrun only the first process writes and prints
    if not is_main:
        sys.stdout = open(os.devnull, "w")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + rank())   # each process samples its own prompts' groups
    output_dir = prepare_output_dir(cfg) if is_main else Path(cfg.output_dir)
    checkpoint = Path(cfg.resume) if cfg.resume else None          # resolved by resume_config
    train_examples = load_manifest(cfg.train, cfg.task) if cfg.steps else []
    test_examples = load_manifest(cfg.test, cfg.task)[:cfg.eval_limit or None]
    dev_examples = load_manifest(cfg.dev, cfg.task)[:cfg.dev_limit or None] if cfg.eval_every and cfg.steps else []
    ensure_audio(train_examples + test_examples + dev_examples)
    timer = Timer()
    processor, policy = load_model(cfg, device)
    if cfg.steps == 0:
        return evaluate_only(cfg, policy, processor, test_examples, output_dir)
    reference = None
    if cfg.algo != "sft" and cfg.beta > 0:       # pi_ref: frozen; with LoRA, the LoRA switched off
        reference = policy if cfg.lora_rank else copy.deepcopy(policy).eval().requires_grad_(False)
    if checkpoint and cfg.lora_rank:    # the base model + the checkpoint's LoRA (and projector)
        try:
            unexpected = policy.load_state_dict(load_trainable(checkpoint), strict=False).unexpected_keys
        except RuntimeError as error:                      # e.g. another --lora_rank
            unexpected = [str(error).splitlines()[-1].strip()]
        if unexpected:
            raise UsageError(f"--resume {checkpoint}: trainable.safetensors does not fit this "
                             f"model ({unexpected[0]}; another --lora_rank?)")
    elif checkpoint:                    # the policy continues; pi_ref stays the base model
        _, policy = load_model(dataclasses.replace(cfg, model=str(checkpoint)), device)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    print(memory_report(policy, reference))
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                              num_warmup_steps=int(cfg.warmup_ratio * cfg.steps),
                              num_training_steps=cfg.steps)
    results = {"config": dataclasses.asdict(cfg), "before": {}, "after": {}}
    base_file, metrics_path = output_dir / "base_eval.json", output_dir / "metrics.jsonl"
    start_step, seconds_before = restore(checkpoint, optimizer, scheduler, output_dir) if checkpoint else (0, 0.0)
    if checkpoint and base_file.is_file():
        results["before"] = json.loads(base_file.read_text())
    elif not checkpoint and not cfg.skip_base_eval:
        with timer("eval"):
            results["before"] = evaluate_modes(policy, processor, test_examples, cfg)
        print_eval("base", results["before"], test_examples, cfg.examples)
        if is_main:
            base_file.write_text(json.dumps(results["before"]))
    if not checkpoint and is_main and metrics_path.exists():
        metrics_path.unlink()           # a fresh run does not append to an old run's metrics
    batch_size = cfg.sft_batch_size if cfg.algo == "sft" else cfg.batch_size
    progress = tqdm(range(start_step, cfg.steps), desc=f"{cfg.algo} {cfg.task}", file=sys.stderr,
                    dynamic_ncols=True, initial=start_step, total=cfg.steps, disable=not is_main)
    train_start = time.perf_counter()
    step = start_step
    with open(metrics_path if is_main else os.devnull, "a", encoding="utf-8") as metrics_file, \
            StopRequest() as stop:
        for step in progress:
            # The global batch of batch_size x processes prompts; each process takes its share.
            examples = batch_at(train_examples, step, batch_size * world(), cfg.seed)
            examples = examples[rank() * batch_size:(rank() + 1) * batch_size]
            with timer("data"):
                batch = make_batch(examples, processor, device)
            try:
                if cfg.algo == "sft":
                    metrics = sft_step(cfg, policy, processor, optimizer, batch, timer,
                                       random.Random(cfg.seed * 7919 + step))
                else:
                    metrics = grpo_step(cfg, policy, reference, processor, optimizer, batch, timer)
            except (FloatingPointError, RuntimeError) as error:
                # A diverged model (e.g. --lr 1e9) first shows as NaN logits in sampling.
                if isinstance(error, RuntimeError) and "probability tensor" not in str(error):
                    raise
                last = checkpoints(output_dir)
                raise TrainingStopped(f"step {step + 1}: {str(error).splitlines()[0]}; stopped "
                                      f"before updating the weights. Last good checkpoint: "
                                      f"{last[-1] if last else 'none (use --save_every)'}") from None
            scheduler.step()
            metrics.update(step=step + 1, lr=scheduler.get_last_lr()[0],
                           seconds=round(seconds_before + time.perf_counter() - train_start, 2))
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                with timer("eval"):
                    metrics["dev_bleu"] = evaluate(policy, processor, dev_examples, cfg, True, cfg.seed)["bleu"]
                if is_main:
                    keep_best(policy, processor, step + 1, metrics["dev_bleu"], output_dir)
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            shown = {k: metrics[k] for k in ("loss", "reward", "kl", "clip_fraction") if k in metrics}
            progress.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
            if cfg.log_every and (step + 1) % cfg.log_every == 0:
                progress.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in metrics.items()))
            stopping = all_sum(stop.requested) > 0             # every process stops at this step
            if stopping or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                saved = save_checkpoint(output_dir, step + 1, policy, processor, optimizer,
                                        scheduler, cfg)
                if stopping:
                    progress.close()
                    raise TrainingStopped(f"interrupted: saved {saved}; continue with: python "
                                          f"grpo_speech.py --resume {shlex.quote(str(saved))}")
    progress.close()
    steps_run = cfg.steps - start_step
    train_seconds = time.perf_counter() - train_start
    if is_main:
        save_model(policy, processor, output_dir / "final", cfg.save_dtype)  # before the long eval
    if world() > 1:
        torch.distributed.barrier()     # best/ and final/ are on disk for every process
    with timer("eval"):
        results["after"] = evaluate_modes(policy, processor, test_examples, cfg)
        print_eval(f"after {cfg.algo}", results["after"], test_examples, cfg.examples)
        if (output_dir / "best" / "best.json").is_file():     # --eval_every: the dev-best model too
            results["best"] = json.loads((output_dir / "best" / "best.json").read_text())
            _, best = load_model(dataclasses.replace(cfg, model=str(output_dir / "best"), lora_rank=0), device)
            results["best"].update(evaluate_modes(best, processor, test_examples, cfg))
            print_eval(f"best on dev, step {results['best']['step']}", results["best"], test_examples, cfg.examples)
    results["timing"] = timing_summary(timer, steps_run, train_seconds)
    if not is_main:
        return results
    write_predictions(output_dir / "predictions.jsonl", test_examples, results)
    with open(output_dir / "results.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print_summary(results, cfg)
    return results


def evaluate_only(cfg: Config, model, processor, examples: list[dict], output_dir: Path) -> dict:
    """--steps 0: score a checkpoint on --test, sampled and greedy; results.json keeps the
    predictions."""
    start = time.perf_counter()
    results = {"config": dataclasses.asdict(cfg), "eval": evaluate_modes(model, processor, examples, cfg)}
    print_eval(f"{cfg.model}, {cfg.eval_audio}", results["eval"], examples, cfg.examples)
    if rank() > 0:
        return results
    with open(output_dir / "results.json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
    print(f"evaluated {len(examples)} clips in {time.perf_counter() - start:.0f} s; wrote "
          f"{output_dir}/results.json")
    return results


def json_or_none(line: str):
    """A metrics line, or None for a line cut short by a crash."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def write_predictions(path: Path, examples: list[dict], results: dict) -> None:
    """One line per test clip: references and every model's answers, to read what it says.
    The predictions then leave results.json, which keeps only the scores."""
    with open(path, "w", encoding="utf-8") as f:
        for index, example in enumerate(examples):
            row = {"where": example["where"], "references": references_of(example)}
            for when in ("before", "after", "best"):
                for mode in ("sampled", "greedy"):
                    if "predictions" in results.get(when, {}).get(mode, {}):
                        row[f"{when}_{mode}"] = results[when][mode]["predictions"][index]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    for when in ("before", "after", "best"):
        for mode in ("sampled", "greedy"):
            results.get(when, {}).get(mode, {}).pop("predictions", None)


class TrainingStopped(RuntimeError):
    """The run stopped early on purpose (Ctrl-C, or a NaN loss): a one-line message, exit 1."""


def timing_summary(timer: Timer, steps: int, train_seconds: float) -> dict:
    phases = {k: round(v, 2) for k, v in timer.seconds.items()}
    train_phases = {k: v for k, v in timer.seconds.items() if k != "eval"}
    total = sum(train_phases.values()) or 1.0
    return {"steps": steps, "seconds_per_step": round(train_seconds / max(steps, 1), 3),
            "train_seconds": round(train_seconds, 1), "phases_seconds": phases,
            "train_share": {k: round(v / total, 3) for k, v in train_phases.items()}}


# =============================================================================================
# 10. CLI
# =============================================================================================
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
    print(f"wrote {cfg.output_dir}/results.json, predictions.jsonl, metrics.jsonl, final/")


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
    try:
        cfg = check_config(resume_config(*parse_args(argv)))
        train(cfg)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopped: interrupted (final/ is written before the final evaluation)", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
