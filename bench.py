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

prints what the 2B and 8B checkpoints need per GPU (the table in docs/real_models.md): parameters from
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
parser.add_argument("--real", choices=("2b", "8b"), help="time real-size GRPO steps (random weights) and stop")
parser.add_argument("--layers", type=int, default=40, help="--real: LLM and encoder depth (40 = the real LLM's)")
parser.add_argument("--narrow", action="store_true",
                    help="--real: narrow widths and short sequences, for a CPU smoke run")
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
# docs/real_models.md: the commands per GPU: 2 prompts x G = 8 sampled at once, log-probs 4 sequences a pass.
ROLLOUT_SEQUENCES, MICRO_BATCH = 2 * 8, 4


# Granite 3.3's multipliers and logits scaling (as data/make_real_shape.py sets them).
GRANITE_3_3 = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
                   logits_scaling=8.0)
# --narrow: the same architecture, narrow enough for a CPU smoke run of --real.
NARROW = {"llm": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2),
          "encoder": dict(hidden_dim=64, num_heads=2, dim_head=32),
          "projector": dict(hidden_size=64, encoder_hidden_size=64, intermediate_size=128, num_attention_heads=2)}


def real_config(size: str, layers: int = 40, narrow: bool = False):
    """The config of ibm-granite/granite-speech-3.3-<size> (from the values above), `layers`
    deep (LLM; the encoder at most its own 16)."""
    from transformers import GraniteSpeechConfig
    config = GraniteSpeechConfig.from_pretrained(gs.DATA_DIR / "granite-speech-tiny")
    shrink = NARROW if narrow else {"llm": {}, "encoder": {}, "projector": {}}
    for part, values in ((config.text_config, {**LLM, **REAL[size], **GRANITE_3_3, **shrink["llm"],
                                               "num_hidden_layers": layers}),
                         (config.encoder_config, {**ENCODER, **shrink["encoder"],
                                                  "num_layers": min(layers, ENCODER["num_layers"])}),
                         (config.projector_config, {**PROJECTOR, **shrink["projector"]})):
        for key, value in values.items():
            setattr(part, key, value)
    return config


def real_model(size: str, layers: int = 40, lora_rank: int = 0, narrow: bool = False):
    import transformers.masking_utils
    from transformers import GraniteSpeechForConditionalGeneration
    # The mask helper asks whether the mask is all ones (.item()), which meta tensors cannot say.
    transformers.masking_utils.fast_all = lambda mask: True
    config = real_config(size, layers, narrow)
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


# ------------------------------------ 0b. real-size GRPO steps on random weights (--real 2b / 8b)
# (dtype, --lora_rank, --micro_batch_size, --gradient_checkpointing): the README's setting first.
REAL_SETTINGS = [("float32", 0, 4, True), ("float32", 0, 2, True), ("float32", 0, 8, True),
                 ("float32", 0, 4, False), ("float32", 64, 4, True), ("bfloat16", 0, 4, True),
                 ("bfloat16", 64, 4, True)]


class IdsTokenizer:
    """Random weights answer random tokens: the rollout scores them as strings of token ids."""
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def synthetic_batch(model, prompts: int, narrow: bool, device) -> gs.Batch:
    """P prompts at the paper's lengths: a clip of 10-20 s (log-mel features, 50 stacked frames
    a second, at most 200 audio tokens) inside 40 text tokens; --narrow: 1-2 s and 8 tokens."""
    config, generator = model.config, torch.Generator().manual_seed(0)
    audio_id, pad = config.audio_token_id, config.text_config.pad_token_id
    rows, features = [], []
    for p in range(prompts):
        seconds = (1 + p % 2) if narrow else (10 + 10 * p / max(prompts - 1, 1))
        frames = int(50 * seconds)
        features.append(torch.randn(frames, 160, generator=generator).to(device))
        audio_tokens = -(-frames // config.window_size) * (config.window_size // config.downsample_rate)
        text = torch.randint(audio_id + 1, config.text_config.vocab_size, (8 if narrow else 40,),
                             generator=generator)
        rows.append(torch.cat([text[:4], torch.full((audio_tokens,), audio_id), text[4:]]))
    length = max(len(r) for r in rows)
    input_ids = torch.stack([torch.cat([torch.full((length - len(r),), pad), r]) for r in rows])
    audio_tokens = [(r == audio_id).sum().item() for r in rows]
    audio_mask = torch.arange(max(audio_tokens))[None, :] < torch.tensor(audio_tokens)[:, None]
    examples = [{"task": "ast", "translation": [" ".join(map(str, text.tolist()))], "where": f"synthetic:{p}"}
                for p in range(prompts)]
    return gs.Batch(examples, input_ids.to(device), (input_ids != pad).long().to(device), features,
                    audio_mask.to(device))


def real_size_model(cfg, narrow: bool, device):
    """A random-init model of the real architecture, built on the device, with a random LoRA
    audio adapter merged as load_model merges the real one, then prepared as load_model does."""
    import tempfile
    from safetensors.torch import save_file
    from transformers import GraniteSpeechForConditionalGeneration
    torch.manual_seed(0)
    config = real_config(args.real, args.layers, narrow)
    with torch.device(device):
        model = GraniteSpeechForConditionalGeneration(config).to(getattr(torch, cfg.dtype))
    llm = model.model.language_model
    adapter = {}
    for layer in range(config.text_config.num_hidden_layers):
        for module in ("q_proj", "v_proj"):
            linear = getattr(llm.layers[layer].self_attn, module)
            key = f"base_model.model.model.language_model.layers.{layer}.self_attn.{module}"
            adapter[f"{key}.lora_A.weight"] = torch.randn(8, linear.in_features) * 0.01
            adapter[f"{key}.lora_B.weight"] = torch.randn(linear.out_features, 8) * 0.01
    with tempfile.TemporaryDirectory() as folder:
        save_file(adapter, f"{folder}/adapter_model.safetensors")
        with open(f"{folder}/adapter_config.json", "w") as f:
            f.write('{"r": 8, "lora_alpha": 16}')
        gs.merge_audio_adapter(model, folder)
    gs.choose_trainable(model, cfg)
    # The audio token is never sampled (suppressed): as EOS it makes every answer full length.
    model.config.text_config.eos_token_id = model.config.audio_token_id
    return model


def estimate(size, layers, dtype, lora_rank, micro_batch, checkpointing, prompts, group_size) -> float:
    """bench.py --memory's estimate for this setting, in GB (activations for 256 + 200 tokens)."""
    model = real_model(size, layers, lora_rank, args.narrow)
    count = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def kept(n, ckpt):                  # bytes one sequence keeps with n layers
        return saved_bytes(real_model(size, n, lora_rank, args.narrow), ckpt)
    activations = kept(1, checkpointing) + (layers - 1) * (kept(2, checkpointing) - kept(1, checkpointing))
    if checkpointing:             # one layer recomputed at a time keeps its whole activations
        activations += kept(2, False) - kept(1, False)
    text = model.config.text_config
    kv_cache = (2 * layers * text.num_key_value_heads * 4 * (PROMPT + COMPLETION) * prompts * group_size
                * text.hidden_size // text.num_attention_heads)
    scale = {"float32": 4, "bfloat16": 2}[dtype]
    return (scale * count * (1 if lora_rank else 2) + 3 * scale * trainable
            + (micro_batch * activations + kv_cache) * scale / 4) / 1e9


def real_step_table():
    """Times two GRPO steps (one to warm up) per setting with grpo_speech's own grpo_step, and
    prints each row as soon as it is measured: a run cut off still leaves its rows."""
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    prompts, completion = (1, 16) if args.narrow else (2, COMPLETION)
    processor = type("Processor", (), {"tokenizer": IdsTokenizer()})()
    print(f"bench --real {args.real}: {args.layers} layers{', narrow' if args.narrow else ''}, {device}, "
          f"P={prompts} x G={args.group_size}, answers of {completion} tokens; seconds of the second step",
          flush=True)
    print(f"{'dtype':<9} {'trains':<9} {'micro':>5} {'ckpt':>4} {'step':>7} {'rollout':>7} {'forward':>7} "
          f"{'backward':>8} {'ref':>6} {'optim':>6} {'tok/s':>6} {'peak GB':>8} {'reserved':>8} {'estimate':>8}",
          flush=True)
    for dtype, lora_rank, micro_batch, checkpointing in REAL_SETTINGS:
        cfg = gs.Config(batch_size=prompts, group_size=args.group_size, max_completion_length=completion,
                        micro_batch_size=micro_batch, gradient_checkpointing=checkpointing,
                        lora_rank=lora_rank, dtype=dtype, eps_high=0.2)
        name = f"{dtype:<9} {f'LoRA {lora_rank}' if lora_rank else 'LLM':<9} {micro_batch:>5} {'on' if checkpointing else 'off':>4}"
        guess = estimate(args.real, args.layers, dtype, lora_rank, micro_batch, checkpointing, prompts, args.group_size)
        policy = base = optimizer = None
        try:
            policy = real_size_model(cfg, args.narrow, device)
            base = policy if lora_rank else copy.deepcopy(policy).eval().requires_grad_(False)
            optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
            batch = synthetic_batch(policy, prompts, args.narrow, device)
            gs.grpo_step(cfg, policy, base, processor, optimizer, batch, gs.Timer())     # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            timer, start = gs.Timer(), time.perf_counter()
            metrics, _ = gs.grpo_step(cfg, policy, base, processor, optimizer, batch, timer)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, t = time.perf_counter() - start, timer.seconds
            if device.type == "cuda":
                peak, reserved = torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9
            else:
                peak, reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, float("nan")
            tokens = metrics["completion_tokens"] * prompts * args.group_size
            print(f"{name} {wall:>7.2f} {t['rollout']:>7.2f} {t['forward']:>7.2f} {t['backward']:>8.2f} "
                  f"{t.get('reference', 0):>6.2f} {t['optimizer']:>6.2f} {tokens / t['rollout']:>6.0f} "
                  f"{peak:>8.2f} {reserved:>8.2f} {guess:>8.2f}", flush=True)
        except torch.OutOfMemoryError:
            print(f"{name} out of memory{'':>58} {guess:>8.2f}", flush=True)
        del policy, base, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    encoder_share(device, prompts)


@torch.no_grad()
def encoder_share(device, prompts):
    """The encoder's time on P clips (encode once) against P x G copies (re-encoding)."""
    cfg = gs.Config(batch_size=prompts, group_size=args.group_size)
    model = real_size_model(cfg, args.narrow, device)
    batch = synthetic_batch(model, prompts, args.narrow, device)
    copies = gs.Batch(batch.examples, batch.input_ids, batch.attention_mask,
                      [f for f in batch.input_features for _ in range(args.group_size)], batch.audio_mask)
    seconds = []
    for b in (batch, batch, copies):                 # the first call warms up
        start = time.perf_counter()
        gs.encode_audio(model, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    print(f"encoder, float32: {seconds[1]:.2f} s on the P clips (encode once), {seconds[2]:.2f} s on "
          f"P x G copies", flush=True)


if args.real:
    if args.threads:
        torch.set_num_threads(args.threads)
    real_step_table()
    raise SystemExit

try:
    cfg = gs.check_config(gs.Config(task=args.task, model=args.model, batch_size=args.batch_size,
                                    group_size=args.group_size, device=args.device, dtype=args.dtype,
                                    max_completion_length=args.max_completion_length,
                                    threads=args.threads))
except gs.UsageError as error:
    raise SystemExit(f"error: {error}")
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
