"""What MesaOPT and MesaLlama share around the mixer (:mod:`.mesa_layer`): the forward's input checks and set-up
(packed documents, the cache with mesa state layers), the LM head and loss, whole-checkpoint loading, and the
conversion from a plain base model (every base weight copied, the mesa parameters fresh)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .mesa_layer import MESA_PARAMETERS

MESA_STRUCTURE = ("mesa_layers", "short_conv_size", "use_output_gate", "use_forget_gate", "use_input_gate",
                  "lambda_min", "num_attention_heads", "num_key_value_heads", "mesa_window", "mesa_window_only")
"""Mesa config fields that give a checkpoint's weights their meaning (:class:`WholeCheckpointMixin`)."""


def packed_document_starts(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, T) bool, True where a packed document starts inside the block (``position_ids`` does not continue by +1,
    HF's convention for packed sequences); None when nothing restarts."""
    starts = F.pad(position_ids[:, 1:] != position_ids[:, :-1] + 1, (1, 0))
    return starts if bool(starts.any()) else None


def check_packed_inputs(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                        cache: Cache | None, use_cache: bool | None) -> torch.Tensor | None:
    """The packed documents' first tokens (:func:`packed_document_starts`) when ``position_ids`` restart inside a
    row and there is no ``attention_mask``; packed inputs take no cache (refused when one is asked for). Positions
    that restart between two real tokens of a row *with* an ``attention_mask`` are refused: the mask would let the
    documents attend to each other (HF's Llama silently does), so a packed batch must come without one."""
    if position_ids is None:
        return None
    if attention_mask is not None:
        if position_ids.shape[-1] == attention_mask.shape[-1] and position_ids.shape[-1] > 1:
            real = attention_mask.bool()
            restart = (position_ids[:, 1:] <= position_ids[:, :-1]) & real[:, 1:] & real[:, :-1]
            if bool(restart.any()):
                raise ValueError("position_ids restart inside a row (packed documents) while an attention_mask is "
                                 "given, which would let the documents attend to each other: pass packed documents "
                                 "without attention_mask (as DataCollatorWithFlattening does), or one per row.")
        return None
    resets = packed_document_starts(position_ids)
    if resets is not None and (cache is not None or use_cache):
        raise ValueError("Packed sequences (position_ids restarting at 0 inside a row) are a training / scoring "
                         "format and take no cache: drop cache= / use_cache=True, or run documents as rows.")
    return resets


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse ids that lie outside the vocabulary, naming the argument."""
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(
            f"input_ids must lie in [0, vocab_size={vocab_size}); got values in "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]. Check the tokenizer matches the model."
        )


def mesa_cache(cache: Cache | None, config) -> Cache:
    """The cache to use: the given one when its layers match ``config.layer_types`` (an empty cache of another
    layout is replaced), else a fresh ``DynamicCache(config)`` with mesa state layers where the mesa layers are."""
    if cache is not None:
        # by layer type, not class: a checkpoint's remote code loaded beside tint_hf defines its own MesaStateLayer,
        # and HF's registry builds the last one imported for the type "mesa"
        is_mesa = [getattr(layer, "_layer_type", None) == "mesa" for layer in cache.layers]
        if is_mesa == [layer_type == "mesa" for layer_type in config.layer_types]:
            return cache
        if cache.get_seq_length() > 0:
            raise ValueError("This cache holds keys and values for every layer (e.g. from peft prefix tuning), but "
                             "mesa layers keep a state, not keys and values: pass a cache made by "
                             "DynamicCache(config=model.config), or none; prefix tuning works on models without mesa "
                             "layers only.")
    return DynamicCache(config=config)


@dataclass
class MesaInputs:
    """What a mesa model's forward starts from: embeddings (B, T, width), the cache (or None), the number of tokens
    it holds, the packed documents' starts (B, T) or None, and the (B, T) token mask of the new tokens or None."""

    inputs_embeds: torch.Tensor
    cache: Cache | None
    past_seen: int
    resets: torch.Tensor | None
    token_mask: torch.Tensor | None


def prepare_mesa_inputs(model: nn.Module, model_name: str, input_ids: torch.Tensor | None,
                        inputs_embeds: torch.Tensor | None, attention_mask: torch.Tensor | None, cache: Cache | None,
                        use_cache: bool | None, position_ids: torch.Tensor | None, kwargs: dict) -> MesaInputs:
    """The checks and set-up shared by the mesa models' forwards: unknown keyword arguments refused, exactly one of
    ``input_ids`` / ``inputs_embeds`` (ids checked and embedded by ``model.embed_tokens``), packed documents found,
    a cache built only outside training (or when given) and never for packed inputs, the mask's shape checked."""
    check_forward_kwargs(kwargs, model_name)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Specify exactly one of input_ids or inputs_embeds.")
    name, given, dims = ("input_ids", input_ids, 2) if input_ids is not None else ("inputs_embeds", inputs_embeds, 3)
    if given.dim() != dims or 0 in given.shape[:2]:
        raise ValueError(f"{name} must be ({'batch, length' + ', hidden' * (dims == 3)}) with batch >= 1 and length "
                         f">= 1, got shape {tuple(given.shape)}.")
    if input_ids is not None:
        check_input_ids(input_ids, model.config.vocab_size)
        inputs_embeds = model.embed_tokens(input_ids)
    resets = check_packed_inputs(attention_mask, position_ids, cache, use_cache)
    if use_cache is None:
        use_cache = model.config.use_cache and not model.training and resets is None
    cache = mesa_cache(cache, model.config) if use_cache or cache is not None else None
    batch, length = inputs_embeds.shape[:2]
    past_seen = cache.get_seq_length() if cache is not None else 0
    if attention_mask is not None and attention_mask.shape != (batch, past_seen + length):
        raise ValueError(f"attention_mask must be (batch, past + new tokens) = {(batch, past_seen + length)}, got "
                         f"{tuple(attention_mask.shape)}.")
    token_mask = None if attention_mask is None else attention_mask[:, -length:]
    return MesaInputs(inputs_embeds, cache, past_seen, resets, token_mask)


def causal_lm_outputs(model: nn.Module, outputs: BaseModelOutputWithPast, labels: torch.Tensor | None,
                      logits_to_keep: int | torch.Tensor, num_items_in_batch: int | None) -> CausalLMOutputWithPast:
    """``model.lm_head`` on the kept positions (``logits_to_keep``: the last N, 0 = all, or an index tensor) and,
    with ``labels`` (B, T; -100 ignored), HF's shifted cross-entropy."""
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    logits = model.lm_head(outputs.last_hidden_state[:, keep, :])
    loss = None
    if labels is not None:
        loss = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size,
                                   num_items_in_batch=num_items_in_batch)
    return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)


def check_forward_kwargs(kwargs: dict, model_name: str) -> None:
    """Refuse keyword arguments a mesa model does not implement, instead of letting ``**kwargs`` swallow them."""
    if kwargs.get("output_attentions"):
        raise ValueError(f"{model_name} does not return attention probabilities (mesa layers have none); "
                         "drop output_attentions.")
    if "past_key_values" in kwargs:
        raise TypeError(f"{model_name} takes the cache as `cache=` (transformers >= 5.24 renamed `past_key_values`).")
    unknown = sorted(set(kwargs) - {"num_items_in_batch", "output_attentions"})
    if unknown:
        raise TypeError(f"{model_name} forward got unsupported keyword argument(s) {unknown}. For packed sequences "
                        "pass position_ids that restart at 0 per document and no attention_mask "
                        "(DataCollatorWithFlattening's default) instead of cu_seq_lens_* / seq_idx.")


class WholeCheckpointMixin:
    """``from_pretrained`` that loads a checkpoint whole or not at all (HF only logs what it could not load).

    Missing, unexpected or mis-shaped weights raise (a plain OPT / Llama folder is pointed at ``from_base``). Config
    edits that keep every weight name and shape (an activation, ``mesa_rope``, a gate switched off, ...) are caught
    by ``weights_built_for``: ``save_pretrained`` writes the values of :attr:`structure_fields` the weights were
    built with into config.json, and loading compares them with the config the model is built from.
    """

    structure_fields: tuple[str, ...] = ()
    from_base: str = ""  # how to start from the plain base model, for the messages

    def structure(self) -> dict:
        """The config values that give the weights their meaning."""
        return {name: getattr(self.config, name, None) for name in self.structure_fields}

    def save_pretrained(self, *args, **kwargs):
        self.config.weights_built_for = self.structure()
        return super().save_pretrained(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        problems = {kind: sorted(map(str, info.get(kind) or ())) for kind in ("missing_keys", "unexpected_keys",
                                                                              "mismatched_keys")}
        problems = {kind: keys[:4] + ([f"... ({len(keys)} in all)"] if len(keys) > 4 else [])
                    for kind, keys in problems.items() if keys}
        if problems:
            plain = all(MESA_PARAMETERS.intersection(key.split(".")) for key in info.get("missing_keys") or ())
            hint = (f"it looks like a plain base-model checkpoint: start from it with {cls.from_base}"
                    if plain and not problems.keys() - {"missing_keys"} else
                    "check that config.json belongs to these weights and was not edited (mesa_layers, "
                    "short_conv_size, use_output_gate, ...)")
            raise ValueError(f"{cls.__name__}.from_pretrained({where!r}) would leave weights random or unused: "
                             f"{problems}; {hint}.")
        built_for = getattr(model.config, "weights_built_for", None)
        if built_for is not None:
            now = model.structure()
            changed = {k: (built_for.get(k), now[k]) for k in now if k in built_for and built_for[k] != now[k]}
            if changed:
                raise ValueError(f"{cls.__name__}.from_pretrained({where!r}): the weights were built for "
                                 + ", ".join(f"{k}={old!r}" for k, (old, _) in changed.items())
                                 + " but the config now says "
                                 + ", ".join(f"{k}={new!r}" for k, (_, new) in changed.items())
                                 + "; restore config.json (or drop the override), or convert again from the base "
                                   "model.")
        return (model, info) if output_loading_info else model


def mesa_model_from_base(model_class: type, base: nn.Module, **mesa_kwargs) -> nn.Module:
    """``model_class`` (a mesa CausalLM) with ``base``'s configuration plus ``mesa_kwargs``, every weight of ``base``
    (:func:`load_base_weights`), its device, dtype and generation config; in eval mode."""
    known = {f.name for f in dataclasses.fields(model_class.config_class)}
    unknown = sorted(set(mesa_kwargs) - known)
    if unknown:
        mesa_fields = known - {f.name for f in dataclasses.fields(type(base.config))}
        raise TypeError(f"Unknown config fields {unknown} for {model_class.__name__}; the mesa fields are "
                        f"{sorted(mesa_fields - {'layer_types'})} (and any field of {type(base.config).__name__}).")
    drop = {"model_type", "architectures", "transformers_version", "auto_map", "weights_built_for"}
    fields = {key: value for key, value in base.config.to_dict().items() if key not in drop}
    model = model_class(model_class.config_class(**{**fields, **mesa_kwargs})).to(device=base.device, dtype=base.dtype)
    load_base_weights(model, base)
    model.generation_config = base.generation_config
    return model.eval()


def load_base_weights(model: nn.Module, base: nn.Module) -> None:
    """Copy every weight of ``base`` into ``model`` (same names); raise unless exactly the mesa parameters are left."""
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    not_mesa = [key for key in missing if not MESA_PARAMETERS.intersection(key.split("."))]
    if unexpected or not_mesa:
        raise ValueError(f"{type(base).__name__} weights did not map onto {type(model).__name__}: unexpected "
                         f"{unexpected}, missing {not_mesa}.")


__all__ = ["MESA_STRUCTURE", "MesaInputs", "WholeCheckpointMixin", "causal_lm_outputs", "check_forward_kwargs",
           "check_input_ids", "check_packed_inputs", "load_base_weights", "mesa_cache", "mesa_model_from_base",
           "packed_document_starts", "prepare_mesa_inputs"]
