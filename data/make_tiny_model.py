"""Build the tiny Granite Speech base model (data/granite-speech-tiny) in five resumable stages.

    python data/make_tiny_model.py            # every stage not yet finished, then the export
    python data/make_tiny_model.py --report   # print what each finished stage measured

The model is a real GraniteSpeechForConditionalGeneration (conformer CTC encoder -> windowed
Q-Former projector -> Granite LLM), only much smaller, saved as a normal Hugging Face checkpoint
that `from_pretrained` loads exactly as it loads ibm-granite/granite-speech-3.3-2b. It is built
the way real speech LLMs are built, each stage starting from the previous one's checkpoint:

    1. ctc        the speech encoder alone, CTC on characters; FROZEN for good afterwards
    2. text       the LLM alone, on text: the tasks' prompts with the English text in place of
                  <|audio|> (En->De translation, copying, spoken-QA facts and questions)
    3. projector  the projector alone, on ASR: it learns to turn speech into what the LLM
                  already reads as English text (encoder and LLM frozen)
    4. mix        projector + LLM on a mix of ASR, AST and SQA speech and the text tasks,
                  stopped while the base is still clearly short of the ceiling
    5. mix2       the same mix, a second cosine cycle at a lower peak learning rate, where AST
                  and SQA learn the base's own style: the correct German renderings and answer
                  wordings other than the one the task splits keep as their reference (see
                  make_data.ast_row and sqa_row)

Each stage writes <work>/<stage>/ (checkpoint + stage.json with its wall time and measured
health: encoder CER, ASR WER, AST and SQA BLEU on the dev splits). A run skips the stages that
have a stage.json, so a build cut short resumes from its last finished stage. None of the
pretraining material is a dev, test or GRPO-train sentence or voice: the text comes fresh from
make_data.py's grammar (minus every sentence and passage of the manifests) and the audio is
synthesized once into data/pretrain-audio/ (git-ignored) with the training voices only, over a
wider range of speed, pitch and pitch range than the task splits.
"""
import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (Blip2QFormerConfig, GraniteConfig, GraniteSpeechConfig,
                          GraniteSpeechEncoderConfig, GraniteSpeechFeatureExtractor,
                          GraniteSpeechForConditionalGeneration, GraniteSpeechProcessor,
                          PreTrainedTokenizerFast, get_scheduler)

DATA_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA_DIR.parent))
sys.path.insert(0, str(DATA_DIR))
import grpo_speech as gs  # noqa: E402  (manifests, audio, prompts, log-probs, evaluation)
import make_data  # noqa: E402  (the grammar, voices and eSpeak NG synthesis)

STAGES = ("ctc", "text", "projector", "mix", "mix2")
CTC_ALPHABET = ["<blank>", " ", "'", ".", ",", "?"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
SPECIAL_TOKENS = ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|audio|>"]
# The chat format of Granite 3.3, without its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|start_of_role|>{{ message['role'] }}<|end_of_role|>"
    "{{ message['content'] }}<|end_of_text|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}")


# ---------------------------------------------------------------------------------------------
# Pretraining material: fresh grammar text, and speech synthesized from part of it
# ---------------------------------------------------------------------------------------------
def manifest_texts():
    """Every sentence and passage of the task manifests: never used for pretraining."""
    texts = set()
    for path in make_data.toy_manifests():
        with open(path, encoding="utf-8") as f:
            texts |= {json.loads(line)["text"] for line in f if line.strip()}
    return texts


def fresh_examples(rng, task, count, exclude):
    """`count` new AST sentences or SQA passages from the grammar, none in `exclude`."""
    rows = []
    while len(rows) < count:
        if task == "ast":
            english, references = make_data.make_ast_example(rng)
            row = {"task": "ast", **make_data.ast_row(english, references)}
        else:
            try:
                passage, question, answers = make_data.make_sqa_example(rng)
            except IndexError:      # make_data's fact retries can exhaust a value list (rare)
                continue
            row = {"task": "sqa", **make_data.sqa_row(passage, question, answers)}
        if row["text"] not in exclude:
            exclude.add(row["text"])
            rows.append(row)
    return rows


def wide_recipe(rng, voices):
    """Training voices only, with speed, pitch and range wider than the task splits use."""
    return {"voice": rng.choice(voices), "speed": rng.randint(110, 240),
            "pitch": rng.randint(10, 90), "range": rng.randint(20, 100)}


def speech_corpus(args):
    """The pretraining speech: a manifest in data/pretrain-audio/, its clips synthesized once."""
    # One folder per corpus recipe: clips are named by position, so another size is another set.
    folder = DATA_DIR / "pretrain-audio" / f"seed{args.seed}-ast{args.corpus_ast}-sqa{args.corpus_sqa}"
    manifest = folder / "corpus.jsonl"
    rng = random.Random(args.seed + 1)
    voices = make_data.voice_splits(random.Random(make_data.SEED))["train"]
    exclude = manifest_texts()
    rows = (fresh_examples(rng, "ast", args.corpus_ast, exclude)
            + fresh_examples(rng, "sqa", args.corpus_sqa, exclude))
    lines = []
    for index, row in enumerate(rows):
        recipe = wide_recipe(rng, voices)
        lines.append({"id": f"pre-{index:05d}", "audio": f"pre-{index:05d}.wav",
                      "speaker": recipe["voice"], **row, "tts": recipe})
    folder.mkdir(parents=True, exist_ok=True)
    make_data.write_jsonl(manifest, lines)
    make_data.synthesize_missing([manifest])
    # Also the task manifests' own small "pretrain" splits (the toy base's few in-domain clips).
    examples = gs.load_manifest(manifest, "ast")
    for task in ("ast", "sqa"):
        examples += gs.load_manifest(DATA_DIR / task / "pretrain.jsonl", task)
    gs.ensure_audio(examples)
    return examples, exclude


def text_pool(args, exclude):
    """Text-only examples (no audio): fresh grammar sentences and passages."""
    rng = random.Random(args.seed + 2)
    return (fresh_examples(rng, "ast", args.text_ast, exclude)
            + fresh_examples(rng, "sqa", args.text_sqa, exclude))


def as_task(example, task):
    """The same clip or text used for another task: any line can be transcribed (ASR)."""
    return dict(example, task=task)


# ---------------------------------------------------------------------------------------------
# The model: tokenizer, architecture
# ---------------------------------------------------------------------------------------------
def build_tokenizer(vocab_size, texts):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|end_of_text|>", bos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>", unk_token="<|end_of_text|>", padding_side="left",
        additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=CHAT_TEMPLATE)


def tokenizer_texts(examples):
    for example in examples:
        yield example["text"]
        yield from example.get("translation", []) + example.get("other_translations", [])
        yield from ([example["question"]] if "question" in example else [])
        yield from example.get("answer", []) + example.get("other_answers", [])
    yield from (task["prompt"] for task in gs.TASKS.values())
    yield "user assistant system"


def build_model(tokenizer, args):
    eos = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    text_config = GraniteConfig(
        vocab_size=len(tokenizer), hidden_size=args.llm_hidden, intermediate_size=args.llm_hidden * 3,
        num_hidden_layers=args.llm_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        tie_word_embeddings=True, attention_multiplier=(args.llm_hidden // 4) ** -0.5)
    encoder_config = GraniteSpeechEncoderConfig(
        input_dim=160, num_layers=args.encoder_layers, hidden_dim=args.encoder_hidden,
        feedforward_mult=2, num_heads=4, output_dim=len(CTC_ALPHABET), context_size=100, max_pos_emb=128,
        dropout=0.1, conv_kernel_size=15, conv_expansion_factor=2)
    projector_config = Blip2QFormerConfig(
        hidden_size=args.encoder_hidden, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=args.encoder_hidden * 2, encoder_hidden_size=args.encoder_hidden,
        cross_attention_frequency=1, max_position_embeddings=64)
    config = GraniteSpeechConfig(
        text_config=text_config, encoder_config=encoder_config, projector_config=projector_config,
        audio_token_index=tokenizer.convert_tokens_to_ids("<|audio|>"),
        has_lora_adapter=False,          # peft adapters are for the real 2B/8B checkpoints
        downsample_rate=5, window_size=15, tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    return GraniteSpeechForConditionalGeneration(config)


def freeze_all_but(model, trainable):
    """Only the named parts train; the rest is frozen and in eval mode (no dropout)."""
    parts = {"encoder": model.model.encoder, "projector": model.model.projector,
             "llm": model.model.language_model}
    model.requires_grad_(False)
    model.eval()
    for name in trainable:
        parts[name].requires_grad_(True)
        parts[name].train()
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# Stage 1: the speech encoder with CTC
# ---------------------------------------------------------------------------------------------
def ctc_targets(text):
    return [CTC_ALPHABET.index(c) for c in text.lower() if c in CTC_ALPHABET[1:]]


def greedy_ctc(logits):
    out, previous = [], 0
    for index in logits.argmax(dim=-1).tolist():
        if index != previous and index != 0:
            out.append(CTC_ALPHABET[index])
        previous = index
    return "".join(out)


@torch.no_grad()
def encoder_cer(model, feature_extractor, examples):
    """Character error rate (%) of the encoder's own CTC head, each clip encoded alone."""
    encoder = model.model.encoder.eval()
    errors = characters = 0
    for example in examples:
        features = feature_extractor([gs.load_audio(example["audio_path"])])["input_features"]
        reference = "".join(CTC_ALPHABET[t] for t in ctc_targets(example["text"]))
        errors += gs.edit_distance(greedy_ctc(encoder.out(encoder(features).last_hidden_state)[0]),
                                   reference)
        characters += len(reference)
    return 100 * errors / characters


def stage_ctc(model, processor, data, args):
    """CTC on characters at the middle layer (where Granite's encoder feeds its CTC posteriors
    back, self-conditioning) and at the last layer."""
    encoder = model.model.encoder
    trainable = freeze_all_but(model, ["encoder"])
    mid_logits = []
    hook = encoder.out.register_forward_hook(lambda module, inputs, output: mid_logits.append(output))
    optimizer = torch.optim.AdamW(trainable, lr=args.ctc_lr)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=args.ctc_steps // 20,
                              num_training_steps=args.ctc_steps)
    for step in tqdm(range(args.ctc_steps), desc=f"1/{len(STAGES)} ctc", file=sys.stderr):
        examples = gs.batch_at(data["speech"], step, args.batch_size, args.seed)
        audio = [gs.load_audio(ex["audio_path"]) for ex in examples]
        inputs = processor.audio_processor(audio)["input_features"]
        lengths = torch.tensor([(len(a) // 160 + 1) // 2 for a in audio]).clamp(max=inputs.shape[1])
        mid_logits.clear()
        final = encoder.out(encoder(inputs).last_hidden_state)
        targets = [torch.tensor(ctc_targets(ex["text"])) for ex in examples]
        loss = 0.0
        for logits in (mid_logits[0], final):
            log_probs = logits.log_softmax(dim=-1).transpose(0, 1)          # (frames, B, chars)
            loss = loss + torch.nn.functional.ctc_loss(
                log_probs, torch.cat(targets), lengths, torch.tensor([len(t) for t in targets]),
                zero_infinity=True) / 2
        step_optimizer(loss, trainable, optimizer, scheduler)
    hook.remove()


# ---------------------------------------------------------------------------------------------
# Stages 2-4: supervised next-token training on speech and text examples
# ---------------------------------------------------------------------------------------------
def text_batch(examples, tokenizer):
    """Prompts with the English text where the audio would be: the LLM learns each task's
    format before it hears anything, and the projector then only has to imitate text."""
    texts = []
    for example in examples:
        content = gs.TASKS[example["task"]]["prompt"].format(question=example.get("question", ""))
        texts.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": content.replace("<|audio|>", example["text"] + " ")}],
            tokenize=False, add_generation_prompt=True))
    return tokenizer(texts, padding=True, return_tensors="pt")


OTHERS = {"ast": "other_translations", "sqa": "other_answers"}


def others(example):
    """A line's correct answers besides its reference (none for ASR, also when an AST clip is
    reused for it)."""
    return example.get(OTHERS[example["task"]], []) if example["task"] in OTHERS else []


def all_renderings(example):
    """Stages 1-4 learn every correct answer: the reference and the other renderings."""
    return gs.references_of(example) + others(example)


def house_style(example):
    """Stage 5 learns the base's own style: the renderings (AST) or wordings (SQA) other than
    the first (the one the task splits score against) where a line has them."""
    return others(example) or gs.references_of(example)


def sft_loss(model, processor, examples, rng, speech: bool, style=all_renderings):
    """Mean cross-entropy of one reference answer per example, drawn from `style(example)`."""
    tokenizer, eos = processor.tokenizer, model.config.text_config.eos_token_id
    targets = gs.answer_ids(tokenizer, [rng.choice(style(ex)) for ex in examples], eos)
    target_ids = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=eos)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(t)) for t in targets], batch_first=True)
    if speech:
        batch = gs.make_batch(examples, processor, "cpu")
        logits = gs.completion_logits(model, batch.input_ids, batch.attention_mask,
                                      gs.encode_audio(model, batch), batch.audio_mask, target_ids)
    else:
        prompts = text_batch(examples, tokenizer)
        logits = gs.completion_logits(model, prompts["input_ids"], prompts["attention_mask"],
                                      None, None, target_ids)
    return gs.sft_loss(gs.sequence_log_probs(logits, target_ids, mask), mask)


def step_optimizer(loss, trainable, optimizer, scheduler):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    scheduler.step()


def pick(rng, pools, weights, count):
    """`count` examples: a task drawn by weight, then an example of that pool."""
    names = list(weights)
    return [rng.choice(pools[name]) for name in rng.choices(names, [weights[n] for n in names],
                                                            k=count)]


def sft_stage(model, processor, data, args, name, parts, steps, lr, speech_weights, text_weights,
              style=all_renderings):
    """Train `parts` on batches of speech examples (task mix `speech_weights`) and text
    examples (`text_weights`); the two losses are averaged."""
    trainable = freeze_all_but(model, parts)
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=steps // 20,
                              num_training_steps=steps)
    speech = {"asr": [as_task(ex, "asr") for ex in data["speech"]],
              "ast": [ex for ex in data["speech"] if ex["task"] == "ast"],
              "sqa": [ex for ex in data["speech"] if ex["task"] == "sqa"]}
    text = {"asr": [as_task(ex, "asr") for ex in data["text"] if ex["task"] == "ast"],
            "ast": [ex for ex in data["text"] if ex["task"] == "ast"],
            "sqa": [ex for ex in data["text"] if ex["task"] == "sqa"]}
    rng = random.Random(f"{args.seed}-{name}")
    for _ in tqdm(range(steps), desc=f"{STAGES.index(name) + 1}/{len(STAGES)} {name}", file=sys.stderr):
        losses = []
        if speech_weights:
            examples = pick(rng, speech, speech_weights, args.batch_size)
            losses.append(sft_loss(model, processor, examples, rng, speech=True, style=style))
        if text_weights:
            examples = pick(rng, text, text_weights, args.batch_size)
            losses.append(sft_loss(model, processor, examples, rng, speech=False, style=style))
        step_optimizer(sum(losses) / len(losses), trainable, optimizer, scheduler)


def stage_text(model, processor, data, args):
    sft_stage(model, processor, data, args, "text", ["llm"], args.text_steps, args.text_lr,
              None, {"ast": 0.5, "asr": 0.2, "sqa": 0.3})


def stage_projector(model, processor, data, args):
    sft_stage(model, processor, data, args, "projector", ["projector"], args.projector_steps,
              args.projector_lr, {"asr": 1.0}, None)


MIX_SPEECH = {"asr": 0.3, "ast": 0.5, "sqa": 0.2}
MIX_TEXT = {"ast": 0.5, "asr": 0.2, "sqa": 0.3}


def stage_mix(model, processor, data, args):
    # Text keeps the LLM's language skills while it learns to listen (speech alone erases them).
    sft_stage(model, processor, data, args, "mix", ["projector", "llm"], args.mix_steps,
              args.mix_lr, MIX_SPEECH, MIX_TEXT)


def stage_mix2(model, processor, data, args):
    # The same mix, a second cosine cycle at a lower peak: AST was still rising when the first
    # ended (dev greedy BLEU 6.0 after 300 steps, 13.9 after 600), and a separate stage keeps
    # the first one's checkpoint and health for comparison. AST and SQA answers here are the
    # renderings and wordings the task splits do not score against: a base that translates and
    # answers well but in another style than the data set's, the situation of a real base on
    # CoVoST2 and LibriSQA (data/README.md).
    sft_stage(model, processor, data, args, "mix2", ["projector", "llm"], args.mix2_steps,
              args.mix2_lr, MIX_SPEECH, MIX_TEXT, house_style)


# ---------------------------------------------------------------------------------------------
# Health after every stage, on the dev splits (never test: test scores the finished base)
# ---------------------------------------------------------------------------------------------
def health(model, processor, dev, listen_llm: bool) -> dict:
    report = {"encoder_cer": round(encoder_cer(model, processor.audio_processor, dev["ast"][:100]), 2)}
    if listen_llm:
        cfg = gs.Config(eval_batch_size=50, max_completion_length=48)
        asr = gs.evaluate(model, processor, [as_task(ex, "asr") for ex in dev["ast"][:100]], cfg,
                          greedy=True, seed=0)
        report["asr_wer"] = round(asr["wer"], 2)
        for task in ("ast", "sqa"):
            result = gs.evaluate(model, processor, dev[task], cfg, greedy=True, seed=0)
            report[f"{task}_bleu"] = round(result["bleu"], 2)
            report[f"{task}_example"] = result["predictions"][0]
    return report


# ---------------------------------------------------------------------------------------------
# The build: stages in order, each resumable, then the export
# ---------------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", default=str(DATA_DIR.parent / "runs" / "tiny-base"),
                        help="where each stage's checkpoint and stage.json go")
    parser.add_argument("--out", default=str(DATA_DIR / "granite-speech-tiny"),
                        help="the exported base model (bfloat16)")
    parser.add_argument("--report", action="store_true", help="print the finished stages' health")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = all cores")
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--encoder_hidden", type=int, default=128)
    parser.add_argument("--encoder_layers", type=int, default=4)
    parser.add_argument("--llm_hidden", type=int, default=192)
    parser.add_argument("--llm_layers", type=int, default=4)
    parser.add_argument("--corpus_ast", type=int, default=12000, help="synthesized AST sentences")
    parser.add_argument("--corpus_sqa", type=int, default=4000, help="synthesized SQA passages")
    parser.add_argument("--text_ast", type=int, default=100000, help="text-only AST sentences")
    parser.add_argument("--text_sqa", type=int, default=30000, help="text-only SQA passages")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--ctc_steps", type=int, default=600)
    parser.add_argument("--ctc_lr", type=float, default=1e-3)
    parser.add_argument("--text_steps", type=int, default=2000)
    parser.add_argument("--text_lr", type=float, default=1e-3)
    parser.add_argument("--projector_steps", type=int, default=300)
    parser.add_argument("--projector_lr", type=float, default=2e-3)
    parser.add_argument("--mix_steps", type=int, default=600)
    parser.add_argument("--mix_lr", type=float, default=5e-4)
    parser.add_argument("--mix2_steps", type=int, default=600)
    parser.add_argument("--mix2_lr", type=float, default=3e-4)
    parser.add_argument("--stop_after", choices=STAGES, default=None,
                        help="stop after this stage (the rest resumes on the next run)")
    args = parser.parse_args()
    work = Path(args.work)
    if args.report:
        for stage in STAGES:
            if (work / stage / "stage.json").is_file():
                print(stage, (work / stage / "stage.json").read_text())
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    speech, exclude = speech_corpus(args)
    data = {"speech": speech, "text": text_pool(args, exclude)}
    dev = {task: gs.load_manifest(DATA_DIR / task / "dev.jsonl", task) for task in ("ast", "sqa")}
    gs.ensure_audio(dev["ast"] + dev["sqa"])
    previous = None
    for stage in STAGES:
        folder = work / stage
        if (folder / "stage.json").is_file():
            print(f"{stage}: done earlier, {(folder / 'stage.json').read_text().strip()}")
            previous = folder
            continue
        if previous is None:
            tokenizer = build_tokenizer(args.vocab_size, tokenizer_texts(data["speech"] + data["text"]))
            feature_extractor = GraniteSpeechFeatureExtractor(projector_window_size=15,
                                                              projector_downsample_rate=5)
            processor = GraniteSpeechProcessor(feature_extractor, tokenizer)
            model = build_model(tokenizer, args)
        else:
            processor = GraniteSpeechProcessor.from_pretrained(previous)
            model = GraniteSpeechForConditionalGeneration.from_pretrained(previous, dtype=torch.float32)
        processor.tokenizer.padding_side = "left"
        torch.manual_seed(args.seed + STAGES.index(stage))
        start = time.time()
        globals()[f"stage_{stage}"](model, processor, data, args)
        minutes = (time.time() - start) / 60
        model.eval()
        report = {"minutes": round(minutes, 1), **health(model, processor, dev, stage != "ctc")}
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        (folder / "stage.json").write_text(json.dumps(report, ensure_ascii=False) + "\n")
        print(f"{stage}: {json.dumps(report, ensure_ascii=False)}", flush=True)
        previous = folder
        if stage == args.stop_after:
            return
    export(previous, Path(args.out))


def export(folder, out):
    """The last stage's checkpoint in bfloat16 (half the size; loaded back in float32)."""
    model = GraniteSpeechForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    GraniteSpeechProcessor.from_pretrained(folder).save_pretrained(out)
    parts = {name: sum(p.numel() for p in module.parameters())
             for name, module in [("encoder", model.model.encoder),
                                  ("projector", model.model.projector),
                                  ("llm", model.model.language_model)]}
    print(f"wrote {out}: {sum(parts.values()) / 1e6:.2f}M parameters {parts}")


if __name__ == "__main__":
    main()
