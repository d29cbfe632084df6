"""Create the tiny Granite Speech checkpoint that the toy base model is trained from.

    python data/make_tiny_model.py --out data/granite-speech-tiny-init --ctc_steps 900

It writes a normal Hugging Face checkpoint directory (config, safetensors weights, tokenizer,
processor config with the Granite feature extractor), so that `from_pretrained` loads it exactly
as it loads ibm-granite/granite-speech-3.3-2b. The architecture is the real one
(GraniteSpeechForConditionalGeneration: conformer CTC encoder -> windowed Q-Former projector ->
Granite LLM), only much smaller. The tokenizer is a byte-level BPE (the kind Granite uses)
trained with `tokenizers` on the toy training text.

The LLM and projector weights are random. The speech encoder is first trained alone with CTC on
characters (Granite Speech's encoder is a CTC encoder trained the same way before the projector
and LLM are attached): trained from scratch end to end through the LLM, a model this small
learns the text prior and ignores the audio for a long time. The base model that GRPO starts
from is this checkpoint after the two SFT pretraining commands in data/README.md.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (Blip2QFormerConfig, GraniteConfig, GraniteSpeechConfig,
                          GraniteSpeechEncoderConfig, GraniteSpeechFeatureExtractor,
                          GraniteSpeechForConditionalGeneration, GraniteSpeechProcessor,
                          PreTrainedTokenizerFast)

DATA_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA_DIR.parent))
import grpo_speech as gs  # noqa: E402  (manifests and audio loading)

CTC_ALPHABET = ["<blank>", " ", "'", ".", ",", "?"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
SPECIAL_TOKENS = ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|audio|>"]
# The chat format of Granite 3.3, without its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|start_of_role|>{{ message['role'] }}<|end_of_role|>"
    "{{ message['content'] }}<|end_of_text|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}")
# Instructions the SFT/GRPO prompts use (kept in step with TASKS in grpo_speech.py).
PROMPTS = ["listen to the speech and translate it into German.",
           "Listen to the audio and answer the following question:",
           "can you transcribe the speech into a written format?"]


def training_text():
    """Every text of the pretrain and train splits: English, German, questions, answers."""
    for task in ("ast", "sqa"):
        for split in ("pretrain", "train"):
            with open(DATA_DIR / task / f"{split}.jsonl", encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    yield row["text"]
                    yield from row.get("translation", [])
                    yield from ([row["question"]] if "question" in row else [])
                    yield from row.get("answer", [])
    yield from PROMPTS
    yield "user assistant system"


def build_tokenizer(vocab_size):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(training_text(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|end_of_text|>", bos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>", unk_token="<|end_of_text|>", padding_side="left",
        additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=CHAT_TEMPLATE)


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


def ctc_targets(text):
    return [CTC_ALPHABET.index(c) for c in text.lower() if c in CTC_ALPHABET[1:]]


def greedy_ctc(logits, length):
    best = logits[:length].argmax(dim=-1).tolist()
    out, previous = [], 0
    for index in best:
        if index != previous and index != 0:
            out.append(CTC_ALPHABET[index])
        previous = index
    return "".join(out)


def edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        previous_diagonal, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            previous_diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1,
                                                    previous_diagonal + (x != y))
    return row[-1]


def ctc_pretrain(model, feature_extractor, steps, batch_size, lr, seed):
    """Train the conformer encoder with CTC on characters, at the middle layer (where Granite's
    encoder feeds its CTC posteriors back, self-conditioning) and at the last layer."""
    encoder = model.model.encoder
    train = [ex for ex in gs.load_manifest(DATA_DIR / "pretrain.jsonl", "asr") if ex["task"] == "asr"]
    dev = gs.load_manifest(DATA_DIR / "ast" / "dev.jsonl", "asr")[:40]
    gs.ensure_audio(train + dev)
    mid_logits = []
    hook = encoder.out.register_forward_hook(lambda module, inputs, output: mid_logits.append(output))
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=lr)
    from transformers import get_scheduler
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=steps // 20,
                              num_training_steps=steps)

    def features(examples):
        audio = [gs.load_audio(ex["audio_path"]) for ex in examples]
        batch = feature_extractor(audio)
        lengths = torch.tensor([(len(a) // 160 + 1) // 2 for a in audio])
        lengths = lengths.clamp(max=batch["input_features"].shape[1])
        return batch["input_features"], lengths

    start = time.time()
    for step in range(steps):
        examples = gs.batch_at(train, step, batch_size, seed)
        inputs, lengths = features(examples)
        encoder.train()
        mid_logits.clear()
        hidden = encoder(inputs).last_hidden_state
        final = encoder.out(hidden)
        targets = [torch.tensor(ctc_targets(ex["text"])) for ex in examples]
        target_lengths = torch.tensor([len(t) for t in targets])
        loss = 0.0
        for logits in (mid_logits[0], final):
            log_probs = logits.log_softmax(dim=-1).transpose(0, 1)          # (T, B, C)
            loss = loss + torch.nn.functional.ctc_loss(
                log_probs, torch.cat(targets), lengths, target_lengths, zero_infinity=True) / 2
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            encoder.eval()
            with torch.no_grad():
                errors = characters = 0
                for i in range(0, len(dev), 20):
                    inputs, lengths = features(dev[i:i + 20])
                    logits = encoder.out(encoder(inputs).last_hidden_state)
                    for ex, row, length in zip(dev[i:i + 20], logits, lengths):
                        reference = "".join(CTC_ALPHABET[t] for t in ctc_targets(ex["text"]))
                        errors += edit_distance(greedy_ctc(row, length), reference)
                        characters += len(reference)
            print(f"ctc step {step + 1}: loss {loss.item():.3f}, dev CER {100 * errors / characters:.1f}%"
                  f" ({time.time() - start:.0f} s)", flush=True)
    hook.remove()
    model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DATA_DIR / "granite-speech-tiny-init"))
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--encoder_hidden", type=int, default=128)
    parser.add_argument("--encoder_layers", type=int, default=4)
    parser.add_argument("--llm_hidden", type=int, default=192)
    parser.add_argument("--llm_layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ctc_steps", type=int, default=900, help="encoder CTC pretraining steps")
    parser.add_argument("--ctc_batch_size", type=int, default=32)
    parser.add_argument("--ctc_lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    random.seed(args.seed)
    tokenizer = build_tokenizer(args.vocab_size)
    feature_extractor = GraniteSpeechFeatureExtractor(projector_window_size=15,
                                                      projector_downsample_rate=5)
    processor = GraniteSpeechProcessor(feature_extractor, tokenizer)
    model = build_model(tokenizer, args)
    if args.ctc_steps:
        ctc_pretrain(model, feature_extractor, args.ctc_steps, args.ctc_batch_size, args.ctc_lr,
                     args.seed)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    count = sum(p.numel() for p in model.parameters())
    parts = {name: sum(p.numel() for p in module.parameters())
             for name, module in [("encoder", model.model.encoder),
                                  ("projector", model.model.projector),
                                  ("llm", model.model.language_model)]}
    print(f"wrote {args.out}: {count / 1e6:.2f}M parameters {parts}, vocab {len(tokenizer)}")


if __name__ == "__main__":
    main()
