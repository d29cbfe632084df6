"""Benchmark the GRPO training step of grpo_speech.py (nanoGPT-style: edit the config, run it).

    python bench.py                        # tiny model, toy AST data, CPU
    python bench.py --task sqa --device cuda --dtype bfloat16

Measures, in one run so that ratios are comparable on a noisy machine:
  1. rollout: model.generate(input_features=...) with num_return_sequences=G, which runs the
     speech encoder on all G copies of every prompt, against encode-once + generate from
     inputs_embeds (what grpo_speech.py does); both greedy tokens must be identical;
  2. a full GRPO step against the sum of its model work (rollout, policy forward and backward,
     reference forward, optimizer), and what the rest (data, reward, bookkeeping) costs;
  3. tokens per second and peak memory.

    python bench.py --memory               # no model runs: the real checkpoints' memory

prints what the 2B and 8B checkpoints need per GPU (the table in the README): parameters from
the real architectures built on the meta device (no weights, no download), weights, reference
copy, gradients and AdamW state as grpo_speech.memory_report counts them, and the activations
the log-prob pass keeps for backward, measured by a saved-tensors hook on the meta device
(and, for one 2B layer, on real CPU tensors: fused attention keeps less than the meta count).
"""
import argparse
import copy
import resource
import time

import torch
from transformers import GenerationMixin

import grpo_speech as gs

# -------------------------------------------------------------------------- config
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--task", default="ast")
parser.add_argument("--model", default=str(gs.DATA_DIR / "granite-speech-tiny"))
parser.add_argument("--batch_size", type=int, default=4, help="prompts per step (P)")
parser.add_argument("--group_size", type=int, default=8, help="G")
parser.add_argument("--max_completion_length", type=int, default=48)
parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of each measurement")
parser.add_argument("--device", default="auto")
parser.add_argument("--dtype", default="float32")
parser.add_argument("--threads", type=int, default=0)
parser.add_argument("--memory", action="store_true", help="print the real checkpoints' memory table and stop")
args = parser.parse_args()

# ------------------------------------------------- 0. memory of the real checkpoints (--memory)
# config.json of ibm-granite/granite-speech-3.3-2b and -8b (written here: no hub access needed):
# the Granite 3.3 2B / 8B instruct LLMs, a 16-layer conformer (440M) and a 2-layer Q-Former.
REAL = {"2b": dict(hidden_size=2048, intermediate_size=8192), "8b": dict(hidden_size=4096, intermediate_size=12800)}
LLM = dict(num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, vocab_size=49160,
           tie_word_embeddings=True)
ENCODER = dict(num_layers=16, hidden_dim=1024, num_heads=8, dim_head=128, feedforward_mult=4,
               context_size=200, max_pos_emb=512, output_dim=348)
PROJECTOR = dict(hidden_size=1024, encoder_hidden_size=1024, intermediate_size=4096,
                 num_attention_heads=16, num_hidden_layers=2)
PROMPT, COMPLETION = 256, 200       # the paper's maximum prompt and completion lengths (tokens)
# The README's commands per GPU: 2 prompts x G = 8 sampled at once, log-probs 4 sequences a pass.
ROLLOUT_SEQUENCES, MICRO_BATCH = 2 * 8, 4


def real_model(size: str, layers: int = 40, lora_rank: int = 0):
    import transformers.masking_utils
    from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration
    # The mask helper asks whether the mask is all ones (.item()), which meta tensors cannot say.
    transformers.masking_utils.fast_all = lambda mask: True
    config = GraniteSpeechConfig.from_pretrained(gs.DATA_DIR / "granite-speech-tiny")
    for part, values in ((config.text_config, {**LLM, **REAL[size], "num_hidden_layers": layers}),
                         (config.encoder_config, ENCODER), (config.projector_config, PROJECTOR)):
        for key, value in values.items():
            setattr(part, key, value)
    with torch.device("meta"):
        model = GraniteSpeechForConditionalGeneration(config).float()
        model.model.encoder.requires_grad_(False)
        model.model.projector.requires_grad_(False)
        if lora_rank:
            model.requires_grad_(False)
            gs.add_lora(model.model.language_model, lora_rank)
    return model


def saved_bytes(model, checkpointing: bool) -> int:
    """Bytes the policy's log-prob pass keeps for backward, for one sequence of PROMPT +
    COMPLETION tokens (the weights themselves not counted)."""
    if checkpointing:
        model.model.language_model.activation_checkpointing_enable()
        model.train()
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage()._cdata not in weights:
            saved[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor
    device = next(model.parameters()).device
    prompt = torch.zeros(1, PROMPT, dtype=torch.long, device=device)
    completion = torch.zeros(1, COMPLETION, dtype=torch.long, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = gs.completion_logits(model, prompt, torch.ones_like(prompt), None, None, completion)
        gs.token_log_probs(logits, completion)
    return sum(saved.values())


def memory_table():
    print(f"per GPU, float32, sequences of {PROMPT} + {COMPLETION} tokens; GB = 1e9 bytes; total = "
          f"weights + reference + grads + AdamW + {MICRO_BATCH} sequences' activations with "
          f"checkpointing + the KV cache of {ROLLOUT_SEQUENCES} sampled sequences")
    print(f"{'model':<5} {'trains':<12} {'params':>7} {'trainable':>9} {'weights':>8} {'reference':>9} "
          f"{'grads+AdamW':>11} {'act/seq':>8} {'act/seq ckpt':>12} {'KV cache':>8} {'total':>6}")
    for size in REAL:
        for lora_rank in (0, 64):
            model = real_model(size, lora_rank=lora_rank)
            count = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            # One layer's activations from the difference of a 2- and a 1-layer model; with
            # checkpointing every layer keeps its input and one layer is recomputed at a time.
            per_seq, per_seq_ckpt = [], []
            for layers in (1, 2):
                per_seq.append(saved_bytes(real_model(size, layers, lora_rank), False))
                per_seq_ckpt.append(saved_bytes(real_model(size, layers, lora_rank), True))
            layer = per_seq[1] - per_seq[0]
            act = per_seq[0] + 39 * layer
            act_ckpt = per_seq_ckpt[0] + 39 * (per_seq_ckpt[1] - per_seq_ckpt[0]) + layer
            text = model.config.text_config              # keys and values, every layer, float32
            kv_cache = (2 * text.num_hidden_layers * text.num_key_value_heads * 4 * (PROMPT + COMPLETION)
                        * ROLLOUT_SEQUENCES * text.hidden_size // text.num_attention_heads)
            total = 4 * count * (1 if lora_rank else 2) + 12 * trainable + MICRO_BATCH * act_ckpt + kv_cache
            print(f"{size:<5} {f'LoRA r={lora_rank}' if lora_rank else 'whole LLM':<12} {count / 1e9:>6.2f}B "
                  f"{trainable / 1e9:>8.3f}B {4 * count / 1e9:>8.1f} {0 if lora_rank else 4 * count / 1e9:>9.1f} "
                  f"{12 * trainable / 1e9:>11.1f} {act / 1e9:>8.2f} {act_ckpt / 1e9:>12.2f} {kv_cache / 1e9:>8.1f} "
                  f"{total / 1e9:>6.1f}")


def cpu_check():
    """The meta count against the same count on real CPU tensors (real attention kernels), for
    one 2B layer: the difference of a 2- and a 1-layer model."""
    per_layer = {}
    for device in ("meta", "cpu"):
        counts = []
        for layers in (1, 2):
            model = real_model("2b", layers)
            if device == "cpu":
                model = model.to_empty(device="cpu")
                for parameter in model.parameters():
                    torch.nn.init.normal_(parameter, std=0.02)
            counts.append(saved_bytes(model, False))
        per_layer[device] = counts[1] - counts[0]
    print(f"one 2B layer, one sequence: {per_layer['meta'] / 1e6:.0f} MB counted on the meta device, "
          f"{per_layer['cpu'] / 1e6:.0f} MB on CPU tensors")


if args.memory:
    memory_table()
    cpu_check()
    raise SystemExit

cfg = gs.check_config(gs.Config(task=args.task, model=args.model, batch_size=args.batch_size,
                                group_size=args.group_size, device=args.device, dtype=args.dtype,
                                max_completion_length=args.max_completion_length,
                                threads=args.threads))
device = gs.setup_device(cfg)
if cfg.threads:
    torch.set_num_threads(cfg.threads)
torch.manual_seed(0)
examples = gs.load_manifest(cfg.train, cfg.task)
gs.ensure_audio(examples[:args.batch_size * (args.repeats + 2)])
processor, policy = gs.load_model(cfg, device)
reference = copy.deepcopy(policy).eval().requires_grad_(False)
optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
G = cfg.group_size


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats=args.repeats):
    """Median seconds of `repeats` calls (after one warm-up call), and the last result."""
    result = fn(0)
    times = []
    for i in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn(i + 1)
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], result


def batch(i):
    return gs.make_batch(gs.batch_at(examples, i, cfg.batch_size, 0), processor, device)


def padded_features(b):
    """The features of a batch padded to its longest clip, as model.generate takes them."""
    return processor.audio_processor([gs.load_audio(ex["audio_path"]) for ex in b.examples])[
        "input_features"].to(device, policy.dtype)


batches = [batch(i) for i in range(args.repeats + 1)]
features = [padded_features(b) for b in batches]
eos = policy.config.text_config.eos_token_id


# ------------------------------------------------- 1. rollout: two ways to sample G answers
# Sampling runs to the full length (min_new_tokens) so that both ways make the same tokens.
def generation_options(greedy):
    # transformers refuses several greedy copies of one prompt: the greedy check uses one.
    sampling = {} if greedy else dict(top_k=0)      # top_k is a sampling flag only
    return dict(num_return_sequences=1 if greedy else G, do_sample=not greedy, **sampling,
                max_new_tokens=cfg.max_completion_length,
                min_new_tokens=0 if greedy else cfg.max_completion_length,
                suppress_tokens=[policy.config.audio_token_id], pad_token_id=eos, eos_token_id=eos)


@torch.no_grad()
def generate_with_features(i, greedy=False, b=None):
    """What model.generate does with audio: the encoder runs on each of the G copies."""
    b, padded = (batches[i], features[i]) if b is None else (b, padded_features(b))
    return policy.generate(input_ids=b.input_ids, attention_mask=b.attention_mask,
                           input_features=padded, input_features_mask=b.audio_mask,
                           **generation_options(greedy))[:, b.input_ids.shape[1]:]


@torch.no_grad()
def generate_encode_once(i, greedy=False, b=None):
    """What grpo_speech.sample does: encode each clip once, generate from merged embeddings."""
    b = batches[i] if b is None else b
    embeds = gs.embed(policy, b.input_ids, gs.encode_audio(policy, b), b.audio_mask)
    return GenerationMixin.generate(policy, inputs_embeds=embeds, attention_mask=b.attention_mask,
                                    **generation_options(greedy))


# One clip, so that no padding reaches the library's encoder (ours encodes each clip alone).
single = gs.make_batch(examples[:1], processor, device)
same = torch.equal(generate_with_features(0, True, single), generate_encode_once(0, True, single))
t_features, _ = timed(generate_with_features)
t_once, _ = timed(generate_encode_once)
with torch.no_grad():
    t_encode, _ = timed(lambda i: gs.encode_audio(policy, batches[i]))
    t_encode_g, _ = timed(lambda i: policy.get_audio_features(
        features[i].repeat_interleave(G, dim=0)))


# --------------------------------------------------------- 2. the GRPO step and its parts
def step(i):
    timer = gs.Timer()
    sync()
    start = time.perf_counter()
    metrics, _ = gs.grpo_step(cfg, policy, reference, processor, optimizer, batches[i], timer)
    sync()
    return time.perf_counter() - start, timer.seconds, metrics


if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
step(0)                                                          # warm-up
runs = [step(i + 1) for i in range(args.repeats)]
step_time = sorted(r[0] for r in runs)[len(runs) // 2]
phases = {name: sorted(r[1].get(name, 0.0) for r in runs)[len(runs) // 2]
          for name in ("rollout", "forward", "backward", "reference", "optimizer", "reward")}
model_work = sum(v for k, v in phases.items() if k != "reward")
completion_tokens = sum(r[2]["completion_tokens"] for r in runs) / len(runs) * cfg.batch_size * G
prompt_tokens = sum(int(b.attention_mask.sum()) for b in batches[1:]) / args.repeats * G
if device.type == "cuda":
    peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU"
else:
    peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB RSS"

# ------------------------------------------------------------------------------ report
name = f"{cfg.task}, P={cfg.batch_size}, G={G}, {device.type}, {policy.dtype}, {torch.get_num_threads()} threads"
print(f"\nbench: {name}, median of {args.repeats}")
print(f"{'measurement':<44}{'seconds':>10}")
print(f"{'rollout, generate(input_features) x G':<44}{t_features:>10.3f}")
print(f"{'rollout, encode once + generate(embeds)':<44}{t_once:>10.3f}   {t_features / t_once:.2f}x faster")
print(f"{'  encoder on P clips / on P*G copies':<44}{t_encode:>10.3f} / {t_encode_g:.3f}")
print(f"{'  greedy tokens identical':<44}{str(same):>10}")
print(f"{'GRPO step (wall)':<44}{step_time:>10.3f}")
for key, value in phases.items():
    print(f"{'  ' + key:<44}{value:>10.3f}   {100 * value / step_time:4.1f}%")
print(f"{'  sum of model work':<44}{model_work:>10.3f}")
print(f"{'  overhead = step / model work':<44}{step_time / model_work:>10.3f}x")
print(f"{'sampled tokens / s (rollout)':<44}{completion_tokens / phases['rollout']:>10.0f}")
print(f"{'trained tokens / s (prompt + completion)':<44}{(prompt_tokens + completion_tokens) / step_time:>10.0f}")
print(f"{'peak memory':<44}{peak:>10}")
