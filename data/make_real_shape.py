"""Build a random-init Granite Speech checkpoint shaped like the real ones, for tests.

    python data/make_real_shape.py runs/real-shape     # writes the checkpoint there

What makes the real checkpoints (ibm-granite/granite-speech-3.3-2b and -8b) different from the
toy base, and is reproduced here with few, narrow layers so that CI can load and train it:
- the Granite 3.3 LLM's multipliers: embedding_multiplier 12, residual_multiplier 0.22,
  attention_multiplier 1/64 and logits_scaling 8 (the toy base has 1, 1, 1/sqrt(d), 1);
- has_lora_adapter: a LoRA adapter on the LLM's q_proj and v_proj, saved beside the model as
  peft saves it (adapter_config.json + adapter_model.safetensors, keys
  base_model.model.<module>.lora_A/B.weight), to be switched on for every prompt with audio.
  Its B is random, not zero (peft's init), so that applying it or not changes the outputs.
The tokenizer and feature extractor are the toy base's: their shapes do not matter here.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (GraniteSpeechConfig, GraniteSpeechForConditionalGeneration,
                          GraniteSpeechProcessor)

TINY = Path(__file__).resolve().parent / "granite-speech-tiny"
GRANITE_3_3 = dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                   attention_multiplier=0.015625, logits_scaling=8.0)


def build(out: Path, rank: int = 4, alpha: int = 8, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = GraniteSpeechConfig.from_pretrained(TINY)
    for name, value in GRANITE_3_3.items():
        setattr(config.text_config, name, value)
    config.text_config.num_hidden_layers = 2
    config.encoder_config.num_layers = 2
    config.has_lora_adapter = True
    model = GraniteSpeechForConditionalGeneration(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    GraniteSpeechProcessor.from_pretrained(TINY).save_pretrained(out)
    weights = {}
    for layer in range(config.text_config.num_hidden_layers):
        for module in ("q_proj", "v_proj"):
            linear = getattr(model.model.language_model.layers[layer].self_attn, module)
            key = f"base_model.model.model.language_model.layers.{layer}.self_attn.{module}"
            weights[f"{key}.lora_A.weight"] = torch.randn(rank, linear.in_features) * 0.05
            weights[f"{key}.lora_B.weight"] = torch.randn(linear.out_features, rank) * 0.05
    save_file(weights, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "base_model_name_or_path": str(out)}, indent=1))
    return out


if __name__ == "__main__":
    print(f"wrote {build(Path(sys.argv[1] if len(sys.argv) > 1 else 'runs/real-shape'))}")
