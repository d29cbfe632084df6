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
args = parser.parse_args()

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
    metrics = gs.grpo_step(cfg, policy, reference, processor, optimizer, batches[i], timer)
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
