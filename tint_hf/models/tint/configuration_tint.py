"""Configuration of TinT (Trainable Transformer in Transformer, Panigrahi et al. 2023)."""

import math

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .auxiliary import auxiliary_spec

LOSS_GRADIENTS = ("ce", "quad", "uniform")
BACKWARDS = ("fd", "exact")


def nearest_divisor(n: int, target: float) -> int:
    """The divisor of ``n`` closest to ``target`` (the larger one on a tie)."""
    return min((k for k in range(1, n + 1) if n % k == 0), key=lambda k: (abs(k - target), -k))


@strict
class TinTConfig(PreTrainedConfig):
    r"""Configuration of a :class:`TinTForCausalLM`.

    TinT simulates an auxiliary language model (``aux_config``, an OPT, GPT-2 or Llama config) whose weights live in
    ``num_prefixes`` prefix-token embeddings of width ``hidden_size``. One forward pass runs the auxiliary forward,
    an approximate backward pass of the summed next-token loss over the training part, ``num_steps`` SGD steps of size
    ``inner_lr`` on the top ``num_simulation_layers`` layers, and the forward pass that predicts the rest.

    Shape rules (the paper's construction; violations raise with the value to change):

    * ``r = d / num_prefixes`` weight rows are stacked in one prefix embedding, so ``num_prefixes`` must divide
      the auxiliary width ``d``, and ``hidden_size = d * (r + 1)`` (r rows plus one bias slot);
    * ``num_attention_heads`` (TinT's softmax heads, each of width ``hidden_size / num_attention_heads``) must
      divide ``hidden_size``, be at least the auxiliary head count, and each TinT head must be wide enough for
      one auxiliary head;
    * the auxiliary MLP is simulated as ``ceil(d_ff / d)`` chunks of d x d maps (zero-padded, which is exact).

    Args:
        aux_config: the auxiliary (simulated) model's config: OPT (pre-LN), GPT-2 or Llama.
        num_prefixes: P, number of prefix tokens (the linear-attention head width); ``None`` picks the divisor of d
            closest to d / 3 (three weight rows per prefix, the paper's 256 for OPT-125M).
        hidden_size: D, TinT's width; ``None`` derives ``d * (d / P + 1)``.
        num_attention_heads: H, TinT's softmax-attention heads; ``None`` uses the auxiliary head count.
        num_simulation_layers: number of top auxiliary layers updated by the inner step; ``None`` = all.
        num_steps: number of simulated SGD steps.
        inner_lr: learning rate of the simulated step on the summed loss (overridable per forward call).
        loss_gradient: gradient injected at the final LayerNorm: ``"ce"`` (exact cross-entropy), ``"quad"``
            (quadratic-loss surrogate) or ``"uniform"`` (uniform prediction).
        backward: LayerNorm / activation backward by TinT's finite difference (``"fd"``) or exactly (``"exact"``).
        fd_scale: N in the finite difference ``N * (f(x + g / N) - f(x))``.
        ln_bias_only: update only the LayerNorm biases (the paper's setting); otherwise also the gains.
        authors_fc2_bias_bug: reproduce the authors' code, which gives the fc2 bias ``d_ff / d`` times the step.
        default_train_fraction: when ``forward`` gets no ``train_mask``, the first ``floor(f * n)`` real tokens of
            each sequence form the training part (the paper's language-modelling protocol).
        reuse_forward_blocks / reuse_backward_blocks: whether the second forward pass and later steps reuse the
            same blocks; only affects the authors'-way dense parameter count (this implementation always shares).
    """

    model_type = "tint"
    attribute_map = {"n_simulation_layers": "num_simulation_layers", "n_steps": "num_steps"}  # earlier checkpoints' names
    sub_configs_defaults = {"aux_config": SubConfigSpec(AutoConfig, model_type="opt")}

    aux_config: dict | PreTrainedConfig | None = None
    num_prefixes: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_simulation_layers: int | None = None
    num_steps: int = 1
    inner_lr: float | int = 1e-6
    loss_gradient: str = "ce"
    backward: str = "fd"
    fd_scale: float | int = 1000.0
    ln_bias_only: bool = True
    authors_fc2_bias_bug: bool = False
    default_train_fraction: float | int = 0.5
    reuse_forward_blocks: bool = True
    reuse_backward_blocks: bool = True
    aux_model_id: str | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = False

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        spec = auxiliary_spec(self.aux_config)
        d = spec.hidden_size
        if self.num_prefixes is None:
            self.num_prefixes = nearest_divisor(d, d / 3)
        P = self.num_prefixes
        if isinstance(P, bool) or not isinstance(P, int) or P <= 0 or d % P:
            raise ValueError(f"num_prefixes={P!r} must be a positive divisor of the auxiliary width d={d} (r = d / "
                             f"num_prefixes weight rows are stacked per prefix); try num_prefixes="
                             f"{nearest_divisor(d, P if isinstance(P, (int, float)) and P > 0 else d / 3)}.")
        r = d // P
        expected = d * (r + 1)
        if self.hidden_size is None:
            self.hidden_size = expected
        if self.hidden_size != expected:
            raise ValueError(f"hidden_size={self.hidden_size} must equal d * (d / num_prefixes + 1) = {expected} "
                             f"for d={d}, num_prefixes={P}; set hidden_size={expected} or change num_prefixes.")
        if self.num_attention_heads is None:
            self.num_attention_heads = spec.num_heads
        H = self.num_attention_heads
        if H <= 0 or self.hidden_size % H or H < spec.num_heads or self.hidden_size // H < spec.head_dim:
            raise ValueError(f"num_attention_heads={H} must divide hidden_size={self.hidden_size}, be >= the "
                             f"auxiliary head count {spec.num_heads}, and leave each TinT head at least "
                             f"{spec.head_dim} wide; e.g. num_attention_heads={spec.num_heads}.")
        if not spec.tied_embeddings:
            raise ValueError("TinT needs an auxiliary model whose LM head is tied to its token embedding "
                             "(tie_word_embeddings=True): the loss-gradient module reads the embedding matrix.")
        if self.num_simulation_layers is None:
            self.num_simulation_layers = spec.num_layers
        if not 1 <= self.num_simulation_layers <= spec.num_layers:
            raise ValueError(f"num_simulation_layers={self.num_simulation_layers} must be in [1, {spec.num_layers}].")
        if self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps} must be >= 1.")
        if self.loss_gradient not in LOSS_GRADIENTS:
            raise ValueError(f"loss_gradient={self.loss_gradient!r}; choose one of {LOSS_GRADIENTS}.")
        if self.backward not in BACKWARDS:
            raise ValueError(f"backward={self.backward!r}; choose one of {BACKWARDS}.")
        for name in ("inner_lr", "fd_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number.")
        if self.fd_scale <= 0:
            raise ValueError(f"fd_scale={self.fd_scale} must be positive.")
        if not 0.0 <= self.default_train_fraction <= 1.0:
            raise ValueError(f"default_train_fraction={self.default_train_fraction} must be in [0, 1].")
        # Sizes the HF machinery (loss, generation, Trainer) reads from the top-level config.
        self.vocab_size = spec.vocab_size
        self.num_hidden_layers = spec.num_layers
        self.max_position_embeddings = spec.max_positions
        self.tie_word_embeddings = spec.tied_embeddings

    @property
    def rows_per_prefix(self) -> int:
        """r = d / P: auxiliary weight rows stored in one prefix embedding."""
        return self.aux_config_spec.hidden_size // self.num_prefixes

    @property
    def aux_config_spec(self):
        return auxiliary_spec(self.aux_config)

    def approximation_kwargs(self) -> dict:
        """The simulated step's switches, as keyword arguments of ``tint_hf.simulate.Approximations``.

        TinT always uses the value-path attention backward, frozen Q/K and embeddings, and sums its descent over
        training-part tokens; the other switches come from this config.
        """
        return dict(stop_attention_grad=True, train_token_mask=True, freeze_qk=True, freeze_embeddings=True,
                    ln_bias_only=self.ln_bias_only, backward=self.backward, fd_scale=self.fd_scale,
                    loss_gradient=self.loss_gradient, authors_fc2_bias_bug=self.authors_fc2_bias_bug)
