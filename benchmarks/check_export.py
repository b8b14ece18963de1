"""Check a causal-LM run's exported adapter outside declora (not a test).

    .venv/bin/python benchmarks/check_export.py runs/smollm2

Loads the base model named in `adapters/average/adapter_config.json` with plain transformers,
applies the adapter with `PeftModel.from_pretrained`, answers the run's sample prompts greedily
through the chat template, and compares the answers with the ones the engine wrote to
`samples.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(run_dir: Path) -> int:
    adapter = run_dir / "adapters" / "average"
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    tok = AutoTokenizer.from_pretrained(base_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter)
    model.eval()
    samples = json.loads((run_dir / "samples.json").read_text())["samples"]
    max_new = yaml.safe_load((run_dir / "config.yaml").read_text())["eval"]["max_new_tokens"]
    same = 0
    for s in samples:
        text = tok.apply_chat_template(
            [{"role": "user", "content": s["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_new, do_sample=False)
        answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        match = answer == s["answer"]
        same += match
        print(f"{'same' if match else 'DIFFERENT'}: {s['prompt']!r} -> {answer!r}")
    print(f"{same}/{len(samples)} answers identical to the engine's")
    return 0 if same == len(samples) else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
