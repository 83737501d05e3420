"""How much memory a TinT step takes per row, estimated from the shapes (what the evaluation splits batches by)."""

from __future__ import annotations


class TinTMemoryEstimates:
    """Memory estimates for :class:`TinTModel` and :class:`TinTForCausalLM` (read on ``self.base_model``)."""

    def update_bytes_per_row(self, tokens: int | None = None) -> int:
        """Bytes one row's own update takes when it trains on ``tokens`` positions: per updated slot its factors
        or its dense copy, whichever is smaller (as the step keeps them, :func:`.prefix_updates.compact`); ``None``:
        the dense copies (the most a row can take). What a batch whose rows train on their own tokens adds per row,
        before temporaries."""
        model = self.base_model
        L, n, d = model.spec.num_layers, model.config.num_simulation_layers, model.spec.hidden_size
        factors = model.backward_block.factor_numel(tokens or 0)
        final = model.final_norm_prefix.numel()
        count = final if tokens is None else min(final, 2 * d)
        for layer in model.layers[L - n:]:
            for slot in factors:
                dense = layer.prefixes[slot].numel()
                count += dense if tokens is None else min(dense, factors[slot])
        return count * model.final_norm_prefix.element_size()

    def step_bytes_per_row(self, tokens: int) -> int:
        """Bytes one row that trains on its own ``tokens`` positions adds to a call, estimated from the shapes (an
        upper bound in practice): its update twice (the step's, and its sum with an earlier update), the activations
        the simulated backward keeps (each simulated layer's block memory) and the loss gradient's softmax over the
        vocabulary (logits and probabilities at every position)."""
        model = self.base_model
        L, n = model.spec.num_layers, model.config.num_simulation_layers
        activations = (sum(layer.memory_numel(tokens) for layer in model.layers[L - n:])
                       + 2 * tokens * model.spec.vocab_size)
        return 2 * self.update_bytes_per_row(tokens) + activations * model.final_norm_prefix.element_size()
