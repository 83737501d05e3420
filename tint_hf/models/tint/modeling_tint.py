"""TinT: a transformer whose forward pass simulates, fine-tunes and re-runs an auxiliary language model.

Panigrahi, Malladi, Xia, Arora, "Trainable Transformer in Transformer" (ICML 2024). One ``TinTForCausalLM``
forward pass on a sequence of T auxiliary tokens

1. runs the auxiliary forward pass (OPT, GPT-2 or Llama-family) with its weights read from prefix embeddings;
2. injects the gradient of the summed next-token loss over the *training part* at the final LayerNorm;
3. runs the approximate backward pass through the top ``num_simulation_layers`` layers, and in the same layers
   adds ``-inner_lr * sum_t dy_t x_t^T`` to the prefix embeddings (the simulated SGD step);
4. re-runs the top layers with the updated prefixes and predicts with them.

The pieces: :mod:`.simulated_modules` (each auxiliary operation and its backward as transformer
modules on the prefix layout), :mod:`.blocks` (a forward block and a backward block per auxiliary layer),
:mod:`.construction` (writing an auxiliary model's weights into the prefixes), :mod:`.adaptation` (the updated
weights), :mod:`.sequence_masks` and :mod:`.outputs`; this file holds the models.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import torch
from torch import nn
from transformers import PreTrainedModel

from .adaptation import TinTAdaptation, added_update, check_adaptation, distinct_rows
from .auxiliary import auxiliary_spec, read_auxiliary, rotary_cos_sin
from .blocks import StepContext, TinTBackwardBlock, TinTForwardBlock
from .configuration_tint import TinTConfig
from .construction import load_auxiliary_into
from .dense_count import authors_dense_parameter_count
from .generation import TinTGenerationMixin
from .memory import TinTMemoryEstimates
from .outputs import TinTCausalLMOutput, TinTModelOutput, as_requested, refuse_outputs
from .prefix_updates import compact
from .sequence_masks import (
    TargetMasks,
    build_target_masks,
    causal_allowed,
    check_call_inputs,
    default_train_mask,
    eval_loss,
    gradient_span,
    step_sizes,
    window_start,
)
from .simulated_modules import TinTLossGradient, TinTNorm


class TinTPreTrainedModel(TinTMemoryEstimates, PreTrainedModel):
    config: TinTConfig
    config_class = TinTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    accepts_loss_kwargs = False  # the loss is a mean over evaluation targets; Trainer must scale it for accumulation
    _no_split_modules = ["TinTForwardBlock"]

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False,
                       dense_equivalent: bool = False) -> int:
        """Parameter count; ``dense_equivalent=True`` counts the construction the authors' way, with every
        selection / permutation matrix stored densely (1,669,324,018 for OPT-125M with block reuse)."""
        if not dense_equivalent:
            return super().num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        config, spec = self.config, self.config.aux_config_spec
        if spec.family not in ("opt", "gpt2"):
            raise ValueError(f"The authors' construction exists for OPT and GPT-2 only, not {spec.family!r}: "
                             "there is no dense-equivalent count to report.")
        return authors_dense_parameter_count(
            aux_family=spec.family, d=spec.hidden_size, num_aux_layers=spec.num_layers, num_aux_heads=spec.num_heads,
            d_ff=spec.ffn_dim, vocab_size=spec.vocab_size, max_positions=spec.max_positions, D=config.hidden_size,
            P=config.num_prefixes, H=config.num_attention_heads, num_simulation_layers=config.num_simulation_layers,
            num_steps=config.num_steps, reuse_forward_blocks=config.reuse_forward_blocks,
            reuse_backward_blocks=config.reuse_backward_blocks, position_offset=spec.position_offset,
        )["total"]

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """``PreTrainedModel.from_pretrained`` that refuses a checkpoint with missing, unexpected or mis-shaped
        weights (HF only logs them): TinT's weights *are* its construction, so a partial load (e.g. a config edited
        to another layer count) would silently simulate garbage."""
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        what = f"TinT checkpoint {args[0] if args else kwargs.get('pretrained_model_name_or_path')}"
        _refuse_partial_load(what, info)
        built_for, now = getattr(model.config, "weights_built_for", None), model.structure()
        if built_for is not None:  # keys as today's fields (a checkpoint may predate a rename)
            built_for = {TinTConfig.attribute_map.get(k, k): v for k, v in built_for.items()}
        if built_for is not None and built_for != now:
            changed = sorted(k for k in now if built_for.get(k) != now[k])
            raise ValueError(f"The {what} was constructed for other values of {changed} than its config now holds "
                             f"(built for {[built_for.get(k) for k in changed]}, now {[now[k] for k in changed]}); "
                             "restore config.json (or drop the override), or rebuild with "
                             "TinTForCausalLM.from_auxiliary.")
        return (model, info) if output_loading_info else model

    def structure(self) -> dict:
        """What the constructed weights depend on beyond their names and shapes: the auxiliary model's config, the
        prefix layout and the simulated layers (written to config.json as ``weights_built_for`` on save)."""
        aux = {k: v for k, v in self.config.aux_config.to_dict().items()
               if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
        return json.loads(json.dumps({"aux_config": aux, "num_prefixes": self.config.num_prefixes,
                                      "num_simulation_layers": self.config.num_simulation_layers}))

    def save_pretrained(self, *args, **kwargs):
        self.config.weights_built_for = self.structure()
        return super().save_pretrained(*args, **kwargs)

    def resize_token_embeddings(self, *args, **kwargs):
        """Refused: TinT's vocabulary is the auxiliary model's, and its prefixes and loss gradient are built for it."""
        raise NotImplementedError("TinT's vocabulary is its auxiliary model's: resize the auxiliary model's token "
                                  "embeddings, then rebuild with TinTForCausalLM.from_auxiliary.")

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """A randomly initialised TinT is not a simulator: build one with ``TinTForCausalLM.from_auxiliary``."""
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)


class TinTModel(TinTPreTrainedModel):
    """The simulator: embeddings, one forward block per auxiliary layer, the final LN prefix, the gradient module
    and a (parameter-free) backward block. Returns final-LN outputs; :class:`TinTForCausalLM` adds the LM head."""

    def __init__(self, config: TinTConfig):
        super().__init__(config)
        spec = config.aux_config_spec
        self.spec = spec
        d, P, D = spec.hidden_size, config.num_prefixes, config.hidden_size
        self.embed_tokens = nn.Embedding(spec.vocab_size, d)
        if spec.learned_positions:
            self.embed_positions = nn.Embedding(spec.max_positions + spec.position_offset, d)
        self.layers = nn.ModuleList(TinTForwardBlock(config) for _ in range(spec.num_layers))
        self.final_norm_prefix = nn.Parameter(torch.zeros(P, D))
        self.final_norm = TinTNorm(spec, P)
        self.loss_gradient = TinTLossGradient(config.loss_gradient)
        self.backward_block = TinTBackwardBlock(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                train_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inner_lr: float | torch.Tensor | None = None,
                return_hidden_before: bool = False, segment_ids: torch.Tensor | None = None,
                logits_to_keep: int = 0, adaptation: TinTAdaptation | None = None, return_dict: bool | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None
                ) -> TinTModelOutput | tuple:
        """Arguments as :meth:`TinTForCausalLM.forward`; returns final-LN outputs of the kept positions."""
        refuse_outputs(self, output_hidden_states, output_attentions)
        if adaptation is not None:
            train_mask = check_adaptation(input_ids, adaptation, train_mask, loss_mask, inner_lr, self.origin())
        masks = self.target_masks(input_ids, attention_mask, train_mask, loss_mask, position_ids, segment_ids)
        start = window_start(masks, logits_to_keep)
        lr = self._step_sizes(inner_lr, input_ids.shape[0])  # (B, 1)
        continued, context = self._lower_layers(input_ids, masks, lr)
        hidden_before = None
        if return_hidden_before:
            initial = self.initial_adaptation(continued)
            hidden_before = self._output_pass(continued, initial, context, start)
        if adaptation is None:
            adaptation = self._step(input_ids, masks, lr, continued, context)
        y = self._output_pass(continued, adaptation, context, start)
        output = TinTModelOutput(last_hidden_state=y, hidden_state_before=hidden_before,
                                 eval_targets=masks.eval[:, start:])
        return as_requested(self, output, return_dict)

    def adapt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              train_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, inner_lr: float | torch.Tensor | None = None,
              segment_ids: torch.Tensor | None = None, add_to: TinTAdaptation | None = None) -> TinTAdaptation:
        """Only the simulated step(s) on training sequences (B, T): the updated weights, one set per row (R = B).
        Arguments as :meth:`TinTForCausalLM.forward`, except that ``train_mask`` defaults to every real token (the
        sequences are the training data).

        ``forward(x, adaptation=model.adapt(d, ...))`` equals the one pass on ``d`` and ``x`` packed as segments
        (``segment_ids``) or, for a ``d`` that is a prefix of ``x``, the one pass on ``x`` with ``train_mask`` on
        ``d``: the step depends on nothing after its last training target.

        ``add_to``: an adaptation of this model (R = 1 or B) to which this call's update is added: the result is
        ``add_to + (step - W)``, W the weights before any step. One simulated step sums per-token terms taken at W,
        and segments that do not attend to each other do not change each other's terms, so for ``num_steps == 1`` this
        is exactly the step on both sets of sequences packed as segments (e.g. the demonstrations once, then each
        query's own tokens: the single-FT variant with the query in the training part). Later steps depend on the
        earlier update, so ``num_steps > 1`` refuses it.

        It follows torch's grad mode like ``forward``: under ``torch.no_grad()`` it keeps no graph; otherwise a loss
        computed with ``forward(x, adaptation=...)`` back-propagates through the simulated step (meta-training), as
        the one pass does. The adaptation remembers the model that made it; another model refuses it.
        """
        if add_to is not None:
            if self.config.num_steps != 1:
                raise ValueError(f"add_to sums the updates of separate steps, which is the joint step only for "
                                 f"num_steps == 1 (this TinT takes {self.config.num_steps}): pack both sets as segments "
                                 "(segment_ids) in one call instead.")
            if add_to.origin != self.origin():
                raise ValueError("add_to was made by another TinT model (or before this one changed); adapt again.")
            if add_to.rows not in (1, input_ids.shape[0]):
                raise ValueError(f"add_to holds {add_to.rows} updates for {input_ids.shape[0]} rows: use one shared "
                                 "update or one per row.")
        if train_mask is None:
            train_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        masks = self.target_masks(input_ids, attention_mask, train_mask, loss_mask, position_ids, segment_ids)
        if gradient_span(masks) <= 1:
            warnings.warn("adapt() found no training target (train_mask / loss_mask leave no next-token target): "
                          "the adaptation is the model's own weights.", stacklevel=2)
        lr = self._step_sizes(inner_lr, input_ids.shape[0])
        continued, context = self._lower_layers(input_ids, masks, lr)
        start = self.initial_adaptation(continued)
        step = self._step(input_ids, masks, lr, continued, context, start)
        if add_to is None:
            return step
        return added_update(add_to, step, start)

    def origin(self) -> tuple:
        """What an adaptation made by this model depends on: the model object, its dtype and device, the simulated
        layers, and the versions of its parameters (any in-place change to a weight, e.g. an optimizer step, makes
        earlier adaptations stale)."""
        weight = self.embed_tokens.weight
        return (id(self), weight.dtype, weight.device, self.config.num_simulation_layers,
                sum(p._version for p in self.parameters()))

    def initial_adaptation(self, hidden: torch.Tensor) -> TinTAdaptation:
        """The auxiliary weights before any step (shared, R = 1)."""
        L, n = self.spec.num_layers, self.config.num_simulation_layers
        return TinTAdaptation([layer.initial_prefixes(hidden) for layer in self.layers[L - n:]],
                              self.final_norm_prefix.unsqueeze(0), self.origin())

    def _lower_layers(self, input_ids: torch.Tensor, masks: TargetMasks,
                      lr: torch.Tensor) -> tuple[torch.Tensor, StepContext]:
        """Embeddings and the layers below the simulated ones (never updated: run once, reused by every pass):
        their output (B, T, d) and the attention / step context of the call."""
        n, L = self.config.num_simulation_layers, self.spec.num_layers
        hidden = self.embed_tokens(input_ids)
        rotary = None
        if self.spec.learned_positions:
            hidden = hidden + self.embed_positions(masks.position_ids + self.spec.position_offset)
        else:
            rotary = rotary_cos_sin(self.spec, masks.position_ids, hidden.dtype)
        context = StepContext(allowed=causal_allowed(masks.attention_mask, masks.segment_ids),
                              train_tokens=masks.train_tokens,
                              token_lr=masks.train_tokens.to(hidden.dtype) * lr.to(hidden.dtype), rotary=rotary)
        for layer in self.layers[: L - n]:
            hidden, _ = layer(hidden, layer.initial_prefixes(hidden), context)
        return hidden, context

    def _step(self, input_ids: torch.Tensor, masks: TargetMasks, lr: torch.Tensor, continued: torch.Tensor,
              context: StepContext, start: TinTAdaptation | None = None) -> TinTAdaptation:
        """The simulated SGD step(s) on the training targets of ``masks`` from the weights ``start`` (default: the
        model's own): per-row updated weights (R = B), each slot in its smaller form (:func:`compact`: the step's
        factors over ``start``, or dense prefixes).

        The training loss depends only on the positions up to its last target (causal attention), and rows that
        agree there receive the same update: the step runs once per distinct leading span (exact, and for a batch
        of prompts sharing their demonstrations, once in all), then every row reads its group's prefixes."""
        adaptation = start if start is not None else self.initial_adaptation(continued)
        span = gradient_span(masks)
        if span <= 1:
            return adaptation
        prefixes, final_prefix = [dict(layer) for layer in adaptation.prefixes], adaptation.final_prefix
        rows, group = distinct_rows(input_ids, masks, span, lr)
        step_context, step_ids = context.select(rows, span), input_ids[rows, :span]
        for _ in range(self.config.num_steps):
            y, memories, final_x_hat, final_x = self._simulated_forward(
                continued[rows, :span], TinTAdaptation(prefixes, final_prefix, adaptation.origin), step_context)
            # Gradient module: loss gradient at the final-LN output, final LN backward + descent.
            grad = self.loss_gradient(y, self.embed_tokens.weight, step_ids, masks.train[rows, : span - 1])
            grad, final_prefix = self.final_norm.backward_descent(
                grad, final_x, final_x_hat, final_prefix, step_context.token_lr, self.config.ln_bias_only,
                self.config.backward, self.config.fd_scale)
            for i in reversed(range(self.config.num_simulation_layers)):
                grad, prefixes[i] = self.backward_block(grad, memories[i], prefixes[i], step_context)
            prefixes = [{slot: compact(p) for slot, p in layer.items()} for layer in prefixes]
            final_prefix = compact(final_prefix)
        return TinTAdaptation(prefixes, final_prefix, adaptation.origin).select(group)

    def _output_pass(self, hidden, adaptation: TinTAdaptation, context, start: int) -> torch.Tensor:
        """Final-LN outputs of positions ``start:``; when earlier segments are not needed, only those positions run."""
        if start > 0 and context.segments_end_at(start):
            return self._simulated_forward(hidden[:, start:], adaptation, context.window(start))[0]
        return self._simulated_forward(hidden, adaptation, context)[0][:, start:]

    def _simulated_forward(self, hidden, adaptation: TinTAdaptation, context):
        """The top layers (those the step updates) and the final LN with the weights of ``adaptation``, keeping
        each block's memory."""
        n, L = self.config.num_simulation_layers, self.spec.num_layers
        memories = []
        for layer, layer_prefixes in zip(self.layers[L - n:], adaptation.prefixes):
            hidden, memory = layer(hidden, layer_prefixes, context)
            memories.append(memory)
        y, x_hat = self.final_norm(hidden, adaptation.final_prefix)
        return y, memories, x_hat, hidden

    def _step_sizes(self, inner_lr: float | torch.Tensor | None, batch: int) -> torch.Tensor:
        """(B, 1) float64: ``inner_lr`` (one number or one per row), or ``config.inner_lr``."""
        lr = self.config.inner_lr if inner_lr is None else inner_lr
        return step_sizes(lr, batch, self.embed_tokens.weight.device)

    def target_masks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     train_mask: torch.Tensor | None, loss_mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None, segment_ids: torch.Tensor | None = None) -> TargetMasks:
        """Validated masks of the call; without ``train_mask``, :func:`.sequence_masks.default_train_mask`."""
        check_call_inputs(input_ids, attention_mask, position_ids, segment_ids, self.spec.vocab_size,
                          self.spec.max_positions)
        if train_mask is None:
            train_mask = default_train_mask(input_ids, attention_mask, self.config.default_train_fraction)
        return build_target_masks(input_ids, attention_mask, train_mask, loss_mask, position_ids, segment_ids)


class TinTForCausalLM(TinTGenerationMixin, TinTPreTrainedModel):
    """TinT with its LM head (tied to the auxiliary token embedding). See the module docstring."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TinTConfig):
        super().__init__(config)
        self.model = TinTModel(config)
        spec = config.aux_config_spec
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                train_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                inner_lr: float | torch.Tensor | None = None, return_logits_before: bool = False,
                segment_ids: torch.Tensor | None = None, logits_to_keep: int = 0,
                adaptation: TinTAdaptation | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, inputs_embeds: torch.Tensor | None = None,
                cache=None, past_key_values=None) -> TinTCausalLMOutput | tuple:
        """One TinT pass: simulate, fine-tune on the training part, predict.

        Args:
            input_ids, attention_mask, position_ids: (B, T) auxiliary tokens, padding (either side; 0/1 values),
                positions.
            train_mask: (B, T) 1 on the training part; default: the first ``config.default_train_fraction`` of
                each sequence's real tokens.
            loss_mask: (B, T) optional restriction of the training targets (e.g. label words only).
            labels: (B, T) targets (usually ``input_ids``); the loss is their mean NLL over evaluation targets
                (an error if the call has none, e.g. a ``train_mask`` of all ones).
            inner_lr: overrides ``config.inner_lr`` for this call: one finite number, or a (B,) tensor with one
                step size per row.
            return_logits_before: also return the logits (and loss) of the auxiliary model before the step.
            segment_ids: (B, T) optional packing of separate sequences into one row (numbered in order): tokens
                attend within their segment only, positions restart per segment. Demonstrations as training segments
                and a query as the last, evaluation segment give the single-FT variant in one pass (one step on the
                summed loss of the separate demonstrations, then the query alone with the updated weights).
            logits_to_keep: return the logits of the last ``logits_to_keep`` positions only (0: all), and the loss on
                them. When those positions form whole segments, the output pass runs on them alone.
            adaptation: predict with weights already updated by :meth:`adapt` (R = 1 shared, or one per row) and
                take no step: ``train_mask`` must be absent or all zero, ``loss_mask`` and ``inner_lr`` absent.
            use_cache: accepted for ``generate()``; TinT keeps no cache (each call simulates the whole sequence).
            return_dict: ``False`` returns ``output.to_tuple()`` (default ``config.return_dict``).
            output_hidden_states, output_attentions: not available (TinT's internal states are not the auxiliary
                model's); ``True`` raises.
            inputs_embeds, cache / past_key_values: not available (the step reads the token ids, and TinT keeps no
                cache); given, they raise (peft's prefix and prompt tuning pass them).
        """
        if cache is not None or past_key_values is not None:
            raise ValueError("TinT takes no past_key_values / cache: it keeps no cache (each call simulates the whole "
                             "sequence), so peft prefix tuning does not apply; adapt the prefix embeddings with "
                             "LoRA (target_parameters) instead.")
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("TinT takes input_ids, not inputs_embeds: its inner step reads the auxiliary token ids "
                             "(loss gradient, tied embedding).")
        refuse_outputs(self, output_hidden_states, output_attentions)
        out = self.model(input_ids, attention_mask, train_mask, loss_mask, position_ids, inner_lr,
                         return_hidden_before=return_logits_before, segment_ids=segment_ids,
                         logits_to_keep=logits_to_keep, adaptation=adaptation, return_dict=True)
        logits = self.lm_head(out.last_hidden_state)
        logits_before = self.lm_head(out.hidden_state_before) if return_logits_before else None
        loss = loss_before = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                                 f"{tuple(labels.shape)}.")
            labels = labels[:, input_ids.shape[1] - logits.shape[1]:]
            loss = eval_loss(logits, labels, out.eval_targets)
            if logits_before is not None:
                loss_before = eval_loss(logits_before, labels, out.eval_targets)
        output = TinTCausalLMOutput(loss=loss, logits=logits, logits_before=logits_before, loss_before=loss_before)
        return as_requested(self, output, return_dict)

    def adapt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              train_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, inner_lr: float | torch.Tensor | None = None,
              segment_ids: torch.Tensor | None = None, add_to: TinTAdaptation | None = None) -> TinTAdaptation:
        """The simulated step alone (see :meth:`TinTModel.adapt`): train once, then call ``forward`` or
        ``generate`` with ``adaptation=`` on any number of batches; ``add_to`` adds this step to an earlier one."""
        return self.model.adapt(input_ids, attention_mask, train_mask, loss_mask, position_ids, inner_lr, segment_ids,
                                add_to)

    @classmethod
    def from_auxiliary(cls, model_or_path: nn.Module | str, dtype: torch.dtype | None = None,
                       progress: bool = False, **construction) -> TinTForCausalLM:
        """Construct TinT from an auxiliary OPT / GPT-2 / Llama model (an instance, a local folder or a Hub id).

        ``construction`` holds :class:`TinTConfig` fields (num_prefixes, num_simulation_layers, inner_lr, ...).
        The prefix embeddings receive the auxiliary weights; nothing else needs values. ``progress`` shows a
        progress bar over the layers.
        """
        unknown = sorted(set(construction) - {f.name for f in dataclasses.fields(TinTConfig)}
                         - set(TinTConfig.attribute_map))
        if unknown:
            own = sorted(set(TinTConfig.__annotations__) - {"aux_config"})  # TinT's own fields, not HF's generic ones
            raise TypeError(f"from_auxiliary got unknown TinTConfig fields {unknown}; TinT's fields are {own}.")
        if isinstance(model_or_path, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            aux, info = AutoModelForCausalLM.from_pretrained(model_or_path, dtype=dtype or torch.float32,
                                                             output_loading_info=True)
            _refuse_partial_load(f"auxiliary checkpoint {model_or_path}", info)
            construction.setdefault("aux_model_id", str(model_or_path))
        else:
            aux = model_or_path
        auxiliary_spec(aux.config)  # clear error for unsupported families before anything else
        config = TinTConfig(aux_config=aux.config.to_dict(), **construction)
        spec, weights = read_auxiliary(aux)
        target_dtype = dtype or weights["embed_tokens"].dtype
        model = cls(config).to(target_dtype)
        with torch.no_grad():
            load_auxiliary_into(model.model, spec, config.num_prefixes, weights, progress)
        model.tie_weights()
        return model.eval()


def _refuse_partial_load(what: str, info: dict) -> None:
    """Raise if ``from_pretrained``'s loading info reports weights that were not loaded exactly."""
    problems = {kind: sorted(map(str, info.get(kind) or ())) for kind in ("missing_keys", "unexpected_keys",
                                                                          "mismatched_keys")}
    problems = {kind: keys[:5] + (["..."] if len(keys) > 5 else []) for kind, keys in problems.items() if keys}
    if problems:
        raise ValueError(f"The {what} does not match its config: {problems}. Check that config.json belongs to "
                         "these weights (and was not edited), or rebuild with TinTForCausalLM.from_auxiliary.")


