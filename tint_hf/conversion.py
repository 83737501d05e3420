"""Converting a pretrained transformer into a (hybrid) mesa model: initialisation, then three stages, each lowering
its own objective against the frozen original (the teacher).

0. ``init``: :meth:`MesaOPTForCausalLM.from_opt` / :meth:`MesaLlamaForCausalLM.from_llama` (every weight reused).
1. ``calibrate``: per converted layer and head, scale the output norm's weight so that the RMS of the mesa head's
   output (the output projection's input) equals the teacher's softmax head's, on calibration batches.
2. ``transfer`` (attention transfer): per converted layer, minimise the MSE between the mesa mixer's output and the
   teacher's softmax attention output, both fed the teacher's cached mixer input; only the mesa parameters train
   (plus q/k/v with ``train_qkv``).
3. ``finetune``: LoRA (peft) on the converted layers' attention (default) or feed-forward projections, mesa
   parameters trainable, with loss ``CE(labels) + kl_weight * KL(teacher || student)`` per token; the adapters are
   merged at the end.

:func:`convert` runs the stages into a folder, one sub-folder per finished stage (a loadable checkpoint) plus
``stages.json`` (settings and loss curves); rerunning continues after the last finished stage (with the random state
saved there, so that it ends where an uninterrupted run would) and refuses to mix stages made with other settings or
from other inputs (the run store of :mod:`tint_hf.runstore`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaForCausalLM, OPTForCausalLM, PreTrainedModel

from .models.mesa import MesaLlamaForCausalLM, MesaOPTForCausalLM
from .models.mesa.mesa_layer import MESA_PARAMETERS
from .runstore import RunStore, RunStoreError, fingerprint_model, fingerprint_tensors, versions

STAGES = ("calibrate", "transfer", "finetune")
RNG_STATE = "rng_state.pt"  # torch's CPU random state after a stage, saved in its folder so that a resumed run matches
# LoRA targets of the fine-tuning stage, as regexes below `layers.<i>.` (OPT and Llama-family names)
LORA_TARGETS = {"attention": r"self_attn\.(q_proj|k_proj|v_proj|out_proj|o_proj)",
                "mlp": r"(mlp\.)?(fc1|fc2|gate_proj|up_proj|down_proj)"}


@dataclass
class ConversionSettings:
    """What :func:`convert` does. ``mesa``: extra :class:`~tint_hf.models.mesa.configuration_mesa.MesaConfigMixin`
    fields (``mesa_solver``, ``cg_steps``, ...)."""

    mesa_layers: list[int]
    mesa: dict = field(default_factory=dict)
    stages: tuple[str, ...] = STAGES
    transfer_steps: int = 200
    transfer_lr: float = 1e-3
    train_qkv: bool = False
    finetune_steps: int = 200
    finetune_lr: float = 5e-4
    lora_rank: int = 8
    lora_target: str = "attention"
    kl_weight: float = 1.0
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages {unknown} unknown; choose from {STAGES} (in that order).")
        if list(self.stages) != [s for s in STAGES if s in self.stages]:
            raise ValueError(f"stages must keep the order {STAGES}, got {list(self.stages)}.")
        if not self.mesa_layers:
            raise ValueError("mesa_layers is empty: name the layers to convert (e.g. [8, 9, 10, 11]).")
        for name, low in (("transfer_steps", 0), ("finetune_steps", 0), ("lora_rank", 1), ("batch_size", 1),
                          ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
        for name, low in (("transfer_lr", "> 0"), ("finetune_lr", "> 0"), ("kl_weight", ">= 0")):
            value = getattr(self, name)
            number = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
            if not number or value < 0 or (value == 0 and low == "> 0"):
                raise ValueError(f"{name}={value!r} must be a finite number {low}.")
        if self.lora_target not in LORA_TARGETS:
            raise ValueError(f"lora_target={self.lora_target!r}: choose one of {sorted(LORA_TARGETS)}.")
        self.stages = tuple(self.stages)


def init_student(teacher: PreTrainedModel, mesa_layers: Sequence[int], **mesa_kwargs) -> PreTrainedModel:
    """The mesa model initialised from ``teacher`` (OPT or a Llama-family model); other families are refused."""
    if isinstance(teacher, OPTForCausalLM):
        return MesaOPTForCausalLM.from_opt(teacher, mesa_layers=list(mesa_layers), **mesa_kwargs)
    if isinstance(teacher, LlamaForCausalLM):
        return MesaLlamaForCausalLM.from_llama(teacher, mesa_layers=list(mesa_layers), **mesa_kwargs)
    raise TypeError(f"Mesa conversion supports OPT and Llama-family models (OPTForCausalLM, LlamaForCausalLM), got "
                    f"{type(teacher).__name__}.")


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder layers of an OPT / Llama-family model or of its mesa counterpart."""
    inner = model.model
    return inner.decoder.layers if hasattr(inner, "decoder") else inner.layers


def output_projection(mixer: nn.Module) -> nn.Linear:
    return mixer.out_proj if hasattr(mixer, "out_proj") else mixer.o_proj


class ActivationRecorder:
    """Forward hooks that keep, per chosen layer, the mixer's input (B, T, hidden), its output (B, T, hidden) and the
    output projection's input (B, T, heads * d); optionally replaces the mixer's input by a given tensor."""

    def __init__(self, model: PreTrainedModel, layers: Sequence[int], replace_inputs: dict | None = None):
        self.inputs, self.outputs, self.heads = {}, {}, {}
        self.handles = []
        for i in layers:
            mixer = decoder_layers(model)[i].self_attn
            self.handles.append(mixer.register_forward_pre_hook(self._pre(i, replace_inputs), with_kwargs=True))
            self.handles.append(mixer.register_forward_hook(self._post(i), with_kwargs=True))
            self.handles.append(output_projection(mixer).register_forward_pre_hook(self._heads(i)))

    def _pre(self, i: int, replace: dict | None) -> Callable:
        def hook(module, args, kwargs):
            if replace is not None:
                if args:
                    args = (replace[i],) + tuple(args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": replace[i]}
            self.inputs[i] = args[0] if args else kwargs["hidden_states"]
            return args, kwargs
        return hook

    def _post(self, i: int) -> Callable:
        def hook(module, args, kwargs, output):
            self.outputs[i] = output[0]
        return hook

    def _heads(self, i: int) -> Callable:
        def hook(module, args):
            self.heads[i] = args[0]
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _batches(blocks: torch.Tensor, batch_size: int, steps: int, seed: int):
    """``steps`` batches of rows of ``blocks`` (N, T), reshuffled each epoch."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=gen)
    position = 0
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(blocks), generator=gen), 0
        yield blocks[order[position : position + batch_size]]
        position += batch_size


def head_rms(per_head_input: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(heads,) RMS over batch, tokens and channels of each head's slice of (B, T, heads * d)."""
    return per_head_input.unflatten(-1, (num_heads, -1)).double().pow(2).mean(dim=(0, 1, 3)).sqrt()


@torch.no_grad()
def calibrate(student: PreTrainedModel, teacher: PreTrainedModel, blocks: torch.Tensor, batch_size: int = 4
              ) -> dict[int, list[float]]:
    """Stage 1: multiply each converted head's ``o_norm.weight`` by RMS(teacher head) / RMS(student head) over
    ``blocks`` (N, T). Returns the ratios applied, per layer."""
    layers = student.config.mesa_layers
    sums = {"teacher": {}, "student": {}}
    for model, key in ((teacher, "teacher"), (student, "student")):
        recorder = ActivationRecorder(model, layers)
        try:
            for start in range(0, len(blocks), batch_size):
                model(blocks[start : start + batch_size])
                for i in layers:
                    heads = decoder_layers(student)[i].self_attn.num_heads
                    squares = head_rms(recorder.heads[i], heads).pow(2)
                    sums[key][i] = sums[key].get(i, 0) + squares
        finally:
            recorder.close()
    ratios = {}
    for i in layers:
        mixer = decoder_layers(student)[i].self_attn
        ratio = (sums["teacher"][i] / sums["student"][i].clamp_min(1e-30)).sqrt()
        mixer.o_norm.weight.mul_(ratio[:, None].to(mixer.o_norm.weight.dtype))
        ratios[i] = ratio.tolist()
    return ratios


def mesa_parameters(student: PreTrainedModel, train_qkv: bool = False) -> list[nn.Parameter]:
    """The converted layers' mesa parameters (and their q/k/v projections with ``train_qkv``)."""
    chosen = []
    for i in student.config.mesa_layers:
        for name, param in decoder_layers(student)[i].self_attn.named_parameters():
            if MESA_PARAMETERS.intersection(name.split(".")) or (train_qkv and name.split(".")[0] in
                                                                ("q_proj", "k_proj", "v_proj")):
                chosen.append(param)
    return chosen


def transfer_loss(student: PreTrainedModel, teacher: PreTrainedModel, batch: torch.Tensor) -> torch.Tensor:
    """Stage 2's objective on ``batch`` (B, T): sum over converted layers of mean((mesa(x_teacher) - attn(x_teacher))^2)
    / mean(attn(x_teacher)^2), the mesa mixer fed the teacher's cached input of that layer."""
    layers = student.config.mesa_layers
    with torch.no_grad():
        recorder = ActivationRecorder(teacher, layers)
        try:
            teacher(batch)
        finally:
            recorder.close()
        inputs, targets = recorder.inputs, recorder.outputs
    recorder = ActivationRecorder(student, layers, replace_inputs=inputs)
    try:
        student(batch)
        return sum((recorder.outputs[i] - targets[i]).pow(2).mean() / targets[i].pow(2).mean() for i in layers)
    finally:
        recorder.close()


def _train(parameters: list[nn.Parameter], objective: Callable[[torch.Tensor], torch.Tensor], blocks: torch.Tensor,
           steps: int, lr: float, batch_size: int, seed: int, desc: str, progress: bool) -> list[float]:
    """AdamW (no weight decay) on ``objective(batch)`` for ``steps`` batches; returns the loss per step."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    losses = []
    bar = tqdm(_batches(blocks, batch_size, steps, seed), total=steps, desc=desc, disable=not progress)
    for batch in bar:
        loss = objective(batch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{desc}: the loss became {loss.item()} at step {len(losses)}; lower the lr.")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return losses


def transfer(student: PreTrainedModel, teacher: PreTrainedModel, blocks: torch.Tensor, steps: int, lr: float,
             batch_size: int = 4, train_qkv: bool = False, seed: int = 0, progress: bool = True) -> list[float]:
    """Stage 2: attention transfer (:func:`transfer_loss`), training only :func:`mesa_parameters`. The window-only
    control (``mesa_window_only``) has no parameters of its own (its window is the original q, k, v): without
    ``train_qkv`` the stage trains nothing and returns no losses."""
    if getattr(student.config, "mesa_window_only", False) and not train_qkv:
        return []
    chosen = mesa_parameters(student, train_qkv)
    for param in student.parameters():
        param.requires_grad_(False)
    for param in chosen:
        param.requires_grad_(True)
    student.train()
    try:
        return _train(chosen, lambda batch: transfer_loss(student, teacher, batch), blocks, steps, lr, batch_size,
                      seed, "attention transfer", progress)
    finally:
        student.eval()
        for param in student.parameters():
            param.requires_grad_(True)


def distillation_loss(student: nn.Module, teacher: PreTrainedModel, batch: torch.Tensor, kl_weight: float
                      ) -> torch.Tensor:
    """Stage 3's objective: next-token cross-entropy + kl_weight * mean over tokens of KL(teacher || student)."""
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher(batch).logits[:, :-1].float(), dim=-1)
    logits = student(batch).logits[:, :-1].float()
    ce = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    kl = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), teacher_logp.flatten(0, 1), log_target=True,
                  reduction="batchmean")
    return ce + kl_weight * kl


def finetune(student: PreTrainedModel, teacher: PreTrainedModel, blocks: torch.Tensor, steps: int, lr: float,
             rank: int = 8, kl_weight: float = 1.0, batch_size: int = 4, seed: int = 0, progress: bool = True,
             layers: Sequence[int] | None = None, target: str = "attention") -> tuple[PreTrainedModel, list[float]]:
    """Stage 3: LoRA (peft, rank ``rank``) on the projections ``target`` (``attention``: q/k/v/output, ``mlp``: the
    feed-forward ones) of ``layers`` (default: the converted layers) plus any mesa parameters, on
    :func:`distillation_loss`; returns the merged model and the losses. ``layers`` and ``target="mlp"`` serve
    controls that are not mesa models (e.g. a model whose attention in those layers is removed)."""
    from ._optional import require

    peft = require("peft", "peft", "The LoRA fine-tuning stage of the mesa conversion")
    if target not in LORA_TARGETS:
        raise ValueError(f"target={target!r}: choose one of {sorted(LORA_TARGETS)}.")
    is_mesa = hasattr(student.config, "mesa_layers")
    layers = student.config.mesa_layers if layers is None and is_mesa else layers
    if not layers:
        raise ValueError("finetune needs layers=[...] for a model that is not a mesa model.")
    names = "|".join(str(i) for i in layers)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                             target_modules=rf".*\.layers\.({names})\.{LORA_TARGETS[target]}")
    wrapped = peft.get_peft_model(student, config)
    if is_mesa:
        for param in mesa_parameters(wrapped.base_model.model):
            param.requires_grad_(True)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    wrapped.train()
    losses = _train(trainable, lambda batch: distillation_loss(wrapped, teacher, batch, kl_weight), blocks, steps, lr,
                    batch_size, seed, "LoRA + KL", progress)
    merged = wrapped.merge_and_unload().eval()
    for param in merged.parameters():
        param.requires_grad_(True)
    return merged, losses


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) of ``blocks`` (N, T)."""
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        logits = model(batch).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def convert(teacher: PreTrainedModel, train_blocks: torch.Tensor, out_dir: str | Path, settings: ConversionSettings,
            eval_blocks: torch.Tensor | None = None, progress: bool = True) -> PreTrainedModel:
    """Run ``settings.stages`` after the initialisation, saving each finished stage to ``out_dir/<stage>`` with
    torch's random state (``RNG_STATE``), its record (losses, held-out perplexity when ``eval_blocks`` (N, T) is
    given) to the run store ``out_dir/stages.jsonl`` (:mod:`tint_hf.runstore`), and a summary of all stages to
    ``out_dir/stages.json``.

    Resumable: a rerun loads the last finished stage and its random state and runs only the rest, ending with the
    same weights as an uninterrupted run. It must be the same conversion: other settings, another teacher (weights
    or dtype), other training or held-out blocks, or other package versions are refused, as are damaged stage files.
    """
    train_blocks = _check_blocks("train_blocks", train_blocks)
    if eval_blocks is not None:
        eval_blocks = _check_blocks("eval_blocks", eval_blocks)
    out_dir = Path(out_dir)
    fresh = f"use another output folder, or delete {out_dir} to start over"
    store = RunStore(out_dir, "stages.jsonl", fresh_start=fresh)
    if not store.records and (out_dir / "stages.json").exists():
        raise RunStoreError(f"{out_dir} holds stages.json but no stages.jsonl records (a conversion written by an "
                            f"older tint_hf, which did not record what it was computed from, or records removed); "
                            f"{fresh}.")
    store.check_settings(asdict(settings))
    store.check_provenance("versions", versions())
    store.check_provenance("teacher", fingerprint_model(teacher))
    store.check_provenance("train_blocks", fingerprint_tensors([("blocks", train_blocks)]))
    store.check_provenance("eval_blocks", None if eval_blocks is None
                           else fingerprint_tensors([("blocks", eval_blocks)]))
    teacher = teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)

    def save(name: str, model: PreTrainedModel, **facts) -> None:
        rng_state = torch.get_rng_state()  # as the next stage finds it (the perplexity draws no random numbers)
        if eval_blocks is not None:
            facts["perplexity"] = perplexity(model, eval_blocks, settings.batch_size)
        model.save_pretrained(out_dir / name)
        torch.save(rng_state, out_dir / name / RNG_STATE)
        store.put(name, facts)
        _write_summary(store, out_dir / "stages.json")

    torch.manual_seed(settings.seed)
    finished = [s for s in ("init",) + settings.stages if s in store]
    if finished:
        student = _load_stage(out_dir / finished[-1], teacher.dtype, fresh)
    else:
        student = init_student(teacher, settings.mesa_layers, **settings.mesa)
        if eval_blocks is not None and "teacher" not in store:
            store.put("teacher", {"perplexity": perplexity(teacher, eval_blocks, settings.batch_size)})
        save("init", student)
    for stage in settings.stages:
        if stage in store:
            continue
        if stage == "calibrate":
            save(stage, student, ratios=calibrate(student, teacher, train_blocks[: 8 * settings.batch_size],
                                                  settings.batch_size))
        elif stage == "transfer":
            losses = transfer(student, teacher, train_blocks, settings.transfer_steps, settings.transfer_lr,
                              settings.batch_size, settings.train_qkv, settings.seed, progress)
            save(stage, student, losses=losses)
        else:
            student, losses = finetune(student, teacher, train_blocks, settings.finetune_steps, settings.finetune_lr,
                                       settings.lora_rank, settings.kl_weight, settings.batch_size, settings.seed,
                                       progress, target=settings.lora_target)
            save(stage, student, losses=losses)
    return student


def _check_blocks(name: str, blocks: torch.Tensor) -> torch.Tensor:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.dtype != torch.long:
        raise ValueError(f"{name} must be a (N, T) tensor of token ids (torch.long), got "
                         f"{getattr(blocks, 'shape', type(blocks).__name__)}; cut a text with "
                         "tint_hf.evaluation.text_blocks.")
    if blocks.numel() == 0:
        raise ValueError(f"{name} is empty ({tuple(blocks.shape)}): give at least one block of at least one token "
                         "(a longer text or a smaller block size).")
    return blocks


def _load_stage(folder: Path, dtype: torch.dtype, fresh: str) -> PreTrainedModel:
    """A finished stage's checkpoint with torch's random state set as it was when that stage ended."""
    redo = (f"delete its line in {folder.parent / 'stages.jsonl'} to redo it from the stage before, or {fresh}")
    if not (folder / "config.json").is_file():
        raise RunStoreError(f"The finished stage {folder.name!r} has no checkpoint in {folder}; {redo}.")
    try:
        student = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    except Exception as error:  # any failure to load (safetensors, config, shapes) is a damaged stage
        raise RunStoreError(f"The checkpoint of the finished stage {folder.name!r} in {folder} does not load "
                            f"({type(error).__name__}: {str(error)[:200]}); {redo}.") from None
    try:  # the random numbers continue where the uninterrupted run's would (the LoRA initialisation draws from them)
        torch.set_rng_state(torch.load(folder / RNG_STATE))
    except Exception as error:  # missing, cut, or not a random state
        raise RunStoreError(f"{folder / RNG_STATE} is missing or damaged ({type(error).__name__}); without it the "
                            f"remaining stages would draw other random numbers than an uninterrupted run; "
                            f"{redo}.") from None
    return student


def _write_summary(store: RunStore, path: Path) -> None:
    """``stages.json``: the settings, the teacher's held-out perplexity and every finished stage's record."""
    stages = {key: {k: v for k, v in record.items() if k != "key"} for key, record in store.records.items()
              if key != "teacher"}
    summary = {"settings": store.settings, "stages": stages}
    if "teacher" in store:
        summary["teacher_perplexity"] = store.get("teacher")["perplexity"]
    path.write_text(json.dumps(summary, indent=1) + "\n")


__all__ = ["LORA_TARGETS", "STAGES", "ActivationRecorder", "ConversionSettings", "calibrate", "convert", "decoder_layers",
           "distillation_loss", "finetune", "head_rms", "init_student", "mesa_parameters", "perplexity", "transfer", "transfer_loss"]
