"""The mesa-layer fields shared by the configurations of the mesa models (MesaOPT, MesaLlama).

A configuration is ``MesaConfigMixin`` + a transformers configuration (``class MesaOPTConfig(MesaConfigMixin, OPTConfig)``), so these are real dataclass fields of it.
"""

import math
from dataclasses import dataclass

from .mesa_op import SOLVERS

BACKENDS = ("torch", "fla", "auto")


@dataclass(repr=False, eq=False)
class MesaConfigMixin:
    r"""Which decoder layers use the mesa-layer instead of softmax attention, and how it solves.

    Args:
        mesa_layers: indices of the decoder layers that use the mesa-layer, or ``"all"``; the other layers keep
            softmax attention (and a key/value cache). Normalised to a sorted list of ints.
        mesa_solver: ``"exact"`` (Cholesky), ``"cg"`` (MesaNet's conjugate gradient), ``"cg1"`` (one CG step) or
            ``"gd"`` (gated linear attention).
        cg_steps: conjugate-gradient iterations of ``"cg"`` over whole sequences (training, prefill).
        cg_steps_decode: CG iterations when decoding one token at a time; None: ``cg_steps``.
        short_conv_size: width of MesaNet's short causal depthwise convolution (+ SiLU) on q, k and v; 0 (the
            default) leaves the projections as the base model's; MesaNet uses 4. Its last inputs are kept in the
            decode cache.
        use_output_gate: multiply each head's normalised output by ``SiLU(g_proj(x))`` (MesaNet's output gate).
        chunk_size: tokens per chunk of the chunkwise-parallel form (the fla backend always uses 64).
        lambda_init / lambda_min: the ridge diagonal is ``lambda = softplus(p) + lambda_min`` per key/value head and
            key channel, initialised to ``lambda_init``; ``lambda_min > 0`` bounds the condition number.
        use_forget_gate: gamma_t = sigmoid(f_proj(x_t)) per key/value head; otherwise gamma = 1 (no forgetting).
        forget_gate_windows: (shortest, longest) initial memory window 1 / (1 - gamma) in tokens, log-spaced
            over the heads (the forget-gate bias initialisation).
        use_input_gate: beta_t = sigmoid(b_proj(x_t)) per key/value head; otherwise beta = 1.
        mesa_backend: ``"torch"`` (pure PyTorch, any device), ``"fla"`` (flash-linear-attention kernels, CUDA; only
            solver ``"cg"``, head width <= 128, no packed sequences; refused otherwise) or ``"auto"`` (fla when
            importable, on CUDA and applicable, else torch).
        mesa_window: w > 0 makes each mesa layer a within-layer hybrid (LoLCATs' window + linear design with the
            mesa-layer as the linear part): softmax attention of the base model's q, k, v over the last w tokens,
            the mesa layer over the older ones, weighted by their attention mass (see ``mesa_window.py``); the
            decode cache keeps the w-token window next to the mesa state. 0 (the default): the mesa layer alone.
        mesa_window_only: the window-only control (requires ``mesa_window > 0``): softmax over the last w tokens and
            nothing older; the mesa part is not run (its parameters stay in the checkpoint, untrained).
        layer_types: derived, one of ``"mesa"`` / ``"full_attention"`` per layer (sets up the generation cache);
            not saved (recomputed from ``mesa_layers`` on load).
    """

    mesa_layers: list[int] | str = "all"
    mesa_solver: str = "cg"
    cg_steps: int = 30
    cg_steps_decode: int | None = None
    short_conv_size: int = 0
    use_output_gate: bool = False
    chunk_size: int = 64
    lambda_init: float | int = 1.0
    lambda_min: float | int = 0.25
    use_forget_gate: bool = True
    forget_gate_windows: list[int | float] | tuple[int | float, int | float] = (16.0, 2048.0)
    use_input_gate: bool = True
    mesa_backend: str = "torch"
    mesa_window: int = 0
    mesa_window_only: bool = False
    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)  # a base model's config.json says e.g. "opt"; this config has its own type
        super().__post_init__(**kwargs)
        self._derive_layer_types()
        self.forget_gate_windows = [float(w) for w in self.forget_gate_windows]
        self.validate_layer_type()
        self._check_mesa_fields()

    @property
    def mesa_head_dim(self) -> int:
        """Channels per head of the mesa layers (the base model's head width)."""
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    def _check_mesa_fields(self) -> None:
        numbers = {"lambda_init": self.lambda_init, "lambda_min": self.lambda_min,
                   "forget_gate_windows": self.forget_gate_windows}
        for name, value in numbers.items():
            if not all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
                raise ValueError(f"{name} must be finite, got {value!r}.")
        if self.mesa_solver not in SOLVERS:
            raise ValueError(f"mesa_solver must be one of {SOLVERS}, got {self.mesa_solver!r}.")
        if self.mesa_backend not in BACKENDS:
            raise ValueError(f"mesa_backend must be one of {BACKENDS}, got {self.mesa_backend!r}.")
        if self.mesa_backend == "fla" and self.mesa_solver != "cg":
            raise ValueError(f"mesa_backend='fla' implements only mesa_solver='cg' (got {self.mesa_solver!r}); use "
                             "mesa_backend='torch' or 'auto' (fla where it applies) for the other solvers.")
        if self.mesa_backend == "fla" and self.mesa_head_dim > 128:
            raise ValueError("mesa_backend='fla' needs a head width <= 128; use mesa_backend='torch' or 'auto'.")
        if not 0 < self.lambda_min < self.lambda_init:
            raise ValueError(f"Need 0 < lambda_min < lambda_init, got {self.lambda_min} and {self.lambda_init}.")
        if self.cg_steps < 1 or self.chunk_size < 1:
            raise ValueError("cg_steps and chunk_size must be positive.")
        if self.cg_steps_decode is not None and self.cg_steps_decode < 1:
            raise ValueError(f"cg_steps_decode must be positive or None (= cg_steps), got {self.cg_steps_decode}.")
        if self.short_conv_size < 0 or self.short_conv_size == 1:
            raise ValueError(f"short_conv_size must be 0 (off) or >= 2 (MesaNet: 4), got {self.short_conv_size}.")
        if isinstance(self.mesa_window, bool) or not isinstance(self.mesa_window, int) or self.mesa_window < 0:
            raise ValueError(f"mesa_window must be an int >= 0 (0: no softmax window), got {self.mesa_window!r}.")
        if self.mesa_window_only and not self.mesa_window:
            raise ValueError("mesa_window_only=True is the window-only control: set mesa_window > 0 (its size).")
        if len(self.forget_gate_windows) != 2 or not 1 < self.forget_gate_windows[0] <= self.forget_gate_windows[1]:
            raise ValueError(f"forget_gate_windows must be (shortest, longest) > 1, got {self.forget_gate_windows}.")

    def to_dict(self) -> dict:
        """The config as saved: without ``layer_types``, which is derived from ``mesa_layers`` on load. (Its
        ``"mesa"`` entries are no layer type transformers knows, so a folder that listed them failed to load in
        code without this class, e.g. ``AutoTokenizer.from_pretrained(folder)`` without ``trust_remote_code``.)"""
        output = super().to_dict()
        output.pop("layer_types", None)
        return output

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        # Keep the derived fields in step when mesa_layers is changed after construction, e.g. by
        # from_pretrained(path, mesa_layers=[...]) or config.mesa_layers = [...].
        if name == "mesa_layers" and "layer_types" in self.__dict__:
            self._derive_layer_types()

    def _derive_layer_types(self) -> None:
        """Normalise ``mesa_layers`` (``"all"`` or indices, negative allowed) and set ``layer_types`` from it."""
        num_layers = self.num_hidden_layers
        if isinstance(self.mesa_layers, str) and self.mesa_layers != "all":
            raise ValueError(f"mesa_layers must be 'all' or a list of layer indices, got {self.mesa_layers!r}.")
        layers = range(num_layers) if self.mesa_layers == "all" else self.mesa_layers
        outside = [i for i in layers if not -num_layers <= int(i) < num_layers]
        if outside:
            raise ValueError(f"mesa_layers {outside} are outside the {num_layers} decoder layers "
                             f"(use indices in [{-num_layers}, {num_layers - 1}]).")
        self.__dict__["mesa_layers"] = sorted({int(i) % num_layers for i in layers})
        self.layer_types = ["mesa" if i in self.mesa_layers else "full_attention" for i in range(num_layers)]

    def validate_layer_type(self):
        """``layer_types`` is derived from ``mesa_layers``; ``"mesa"`` is the cache layer type of mesa layers."""
        expected = ["mesa" if i in self.mesa_layers else "full_attention" for i in range(self.num_hidden_layers)]
        if self.layer_types != expected:
            raise ValueError(f"layer_types {self.layer_types} disagree with mesa_layers {self.mesa_layers}.")


__all__ = ["BACKENDS", "MesaConfigMixin"]
