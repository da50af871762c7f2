"""Insert a global (full-attention, NoPE) layer into a training state of the built-in model, keeping
its function: the new layer is a copy of the model's last global layer with its attention output
projection and every expert's (and the shared expert's) down projection set to zero, so its
residual contribution is zero and the grown model gives the same logits as before (the block
expansion of LLaMA Pro). Optimizer moments and per-parameter steps of the layers at and after the
insertion point move with their layers; the new layer starts with none (Adam initialises it).

Why (issue 22): with the only global layer last, a position at the start of a chunk sees nothing
but itself in every layer below it, so inside an answer that crosses a chunk boundary it no longer
knows it is answering (held-out offset sweep: 0/20 for answers across a boundary). A global layer
below the last gives that position the context the last layer's retrieval needs.

    python scripts/grow_demo_model.py STATE_DIR --at 2
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ZEROED = ("self_attn.o_proj.weight", "feed_forward.experts.down_proj", "feed_forward.shared_expert.down_proj.weight")


def _shift(name: str, at: int, pattern: re.Pattern) -> str:
    m = pattern.search(name)
    if not m or int(m.group(1)) < at:
        return name
    return name[:m.start(1)] + str(int(m.group(1)) + 1) + name[m.end(1):]


def grow(state: Path, at: int) -> dict:
    cfg = json.loads((state / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    if not 0 < at <= n:
        raise SystemExit(f"--at must be in 1..{n} (the new layer's index), got {at}")
    globals_ = [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"]
    if not globals_:
        raise SystemExit("the model has no global layer to copy")
    source = globals_[-1]
    hf = re.compile(r"^model\.layers\.(\d+)\.")
    weights = load_file(str(state / "model.safetensors"))
    grown = {_shift(k, at, hf): v for k, v in weights.items()}
    prefix = f"model.layers.{source}."
    for k, v in weights.items():
        if k.startswith(prefix):
            suffix = k[len(prefix):]
            grown[f"model.layers.{at}.{suffix}"] = torch.zeros_like(v) if suffix in ZEROED else v.clone()
    save_file(grown, str(state / "model.safetensors"), metadata={"format": "pt"})

    core = re.compile(r"^layers\.(\d+)\.")
    opt_file = state / "optimizer.safetensors"
    if opt_file.is_file():
        moments = load_file(str(opt_file))
        save_file({_shift(k, at, core): v for k, v in moments.items()}, str(opt_file))
    trainer = json.loads((state / "trainer_state.json").read_text())
    trainer["optimizer_scalars"] = {_shift(k, at, core): v for k, v in trainer["optimizer_scalars"].items()}
    trainer.setdefault("grown", []).append({"at": at, "copied_from": source, "step": trainer["step"]})
    (state / "trainer_state.json").write_text(json.dumps(trainer, indent=1))

    def insert(values: list, value):
        return values[:at] + [value] + values[at:]
    cfg["num_hidden_layers"] = n + 1
    cfg["layer_types"] = insert(cfg["layer_types"], "full_attention")
    cfg["no_rope_layers"] = insert(cfg["no_rope_layers"], 0)
    if "moe_layers" in cfg:  # the copy is sparse where its source is
        moe = [i + (i >= at) for i in cfg["moe_layers"]]
        cfg["moe_layers"] = sorted(moe + ([at] if source in cfg["moe_layers"] else []))
    (state / "config.json").write_text(json.dumps(cfg, indent=2))
    return {"layers": n + 1, "at": at, "copied_from": source, "layer_types": cfg["layer_types"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("state", type=Path, help="a training state directory (config.json, model.safetensors, ...)")
    p.add_argument("--at", type=int, required=True, help="index of the new layer")
    print(json.dumps(grow(**vars(p.parse_args()))))


if __name__ == "__main__":
    main()
