"""A float64 MAC trainer written from the formulas, independent of macfn's capture, kernels and step.

Forward hooks keep every Linear and Conv2d input, the mean activation comes from explicit
row matrices and ``F.unfold`` patches (tests/_reference.py), and each layer's gradient rows
are multiplied by the explicit ``d x d`` matrix ``I - abar abar^T / (rho + |abar|^2)``.
Self-attention through nn.MultiheadAttention (batch first) takes the attention probabilities
the module itself returns with ``need_weights=True``: the value rows of ``in_proj_weight`` use
the mean of the rows of ``S X``, and ``out_proj`` the mean of the heads' concatenated outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from tests import _reference as ref


class DenseMAC:
    """Train a float64 copy of ``model`` with dense MAC and heavy-ball momentum.

    Statistics are refreshed on every step. Each Linear or Conv2d module with its own
    weight is one layer; its bias is preconditioned with the weight.
    """

    def __init__(self, model: nn.Module, *, lr: float, momentum: float, weight_decay: float, damping: float,
                 stat_decay: float) -> None:
        self.model = copy.deepcopy(model).double()
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.damping, self.stat_decay = damping, stat_decay
        self.names = {id(p): name for name, p in self.model.named_parameters()}
        self.inputs: dict[nn.Module, list[Tensor]] = {}
        self.attention_calls: dict[nn.MultiheadAttention, list[tuple[Tensor, Tensor | None]]] = {}
        self._replaying = False
        self.running: dict[str, Tensor] = {}
        self.count = 0
        self.buffers: dict[str, Tensor] = {}
        for module in self.model.modules():
            if isinstance(module, nn.MultiheadAttention):
                assert module.batch_first, "DenseMAC supports batch_first attention only"
                assert module._qkv_same_embed_dim, "DenseMAC supports a packed in_proj_weight only"
                assert module.bias_k is None, "DenseMAC does not support add_bias_kv"
                module.register_forward_hook(self._record_attention, with_kwargs=True)
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                module.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        self.inputs.setdefault(module, []).append(args[0].detach())

    def _record_attention(self, module: nn.MultiheadAttention, args: tuple[Tensor, ...], kwargs: dict,
                          output: object) -> None:
        if self._replaying:
            return
        query, key, value = args[:3]
        assert query is key is value, "DenseMAC supports self-attention only"
        mask = kwargs.get("attn_mask")
        self.attention_calls.setdefault(module, []).append((query.detach(), mask))

    def _attention_means(self, module: nn.MultiheadAttention, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Return ``[3, d]`` (query, key and value rows of in_proj_weight) and ``[1, d]`` (out_proj) means."""
        self._replaying = True
        with torch.no_grad():
            _, probabilities = module(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)
        self._replaying = False
        batch, tokens, width = x.shape
        heads = module.num_heads
        has_bias = module.in_proj_bias is not None
        rows = ref.linear_mean(x, has_bias)[0]
        inputs = torch.cat([x, torch.ones(batch, tokens, 1, dtype=x.dtype)], dim=-1) if has_bias else x
        # The rows of S X, one per (sample, head, query): [batch, heads, tokens, d] -> mean [d].
        value_rows = torch.einsum("bhqk,bkd->bhqd", probabilities, inputs)
        in_proj_mean = torch.stack([rows, rows, value_rows.reshape(-1, value_rows.shape[-1]).mean(dim=0)])

        with torch.no_grad():
            weight_v = module.in_proj_weight[2 * width:]
            bias_v = module.in_proj_bias[2 * width:] if has_bias else None
            values = nn.functional.linear(x, weight_v, bias_v).reshape(batch, tokens, heads, -1).transpose(1, 2)
            heads_output = (probabilities @ values).transpose(1, 2).reshape(batch, tokens, width)
        out_proj_mean = ref.linear_mean(heads_output, module.out_proj.bias is not None)
        return in_proj_mean, out_proj_mean

    def params(self) -> dict[str, Tensor]:
        """Return a detached copy of the current parameters, keyed by name."""
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    def step(self, loss_fn: Callable[[nn.Module], Tensor]) -> dict[str, Tensor]:
        """Take one step on ``loss_fn(model)`` and return the parameters after it."""
        self.inputs = {}
        self.attention_calls = {}
        loss = loss_fn(self.model)
        named = dict(self.model.named_parameters())
        grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
        self.count += 1

        layers: list[tuple[str, str | None, Tensor]] = []
        for module, calls in self.inputs.items():
            assert len(calls) == 1, "DenseMAC supports one call per layer"
            bias_name = self.names[id(module.bias)] if module.bias is not None else None
            if isinstance(module, nn.Conv2d):
                mean = ref.conv2d_mean(module, calls[0])
            else:
                mean = ref.linear_mean(calls[0], bias_name is not None)
            layers.append((self.names[id(module.weight)], bias_name, mean))
        for attention, attention_calls in self.attention_calls.items():
            assert len(attention_calls) == 1, "DenseMAC supports one call per layer"
            in_proj_mean, out_proj_mean = self._attention_means(attention, *attention_calls[0])
            in_proj_bias = self.names[id(attention.in_proj_bias)] if attention.in_proj_bias is not None else None
            out_proj = attention.out_proj
            out_proj_bias = self.names[id(out_proj.bias)] if out_proj.bias is not None else None
            layers.append((self.names[id(attention.in_proj_weight)], in_proj_bias, in_proj_mean))
            layers.append((self.names[id(out_proj.weight)], out_proj_bias, out_proj_mean))

        directions = dict(grads)
        for weight_name, bias_name, mean in layers:
            running = self.running.get(weight_name, torch.zeros_like(mean))
            running = self.stat_decay * running + (1 - self.stat_decay) * mean
            self.running[weight_name] = running
            abar = running / (1 - self.stat_decay ** self.count)

            rows = ref.layer_grad_rows(grads[weight_name], grads[bias_name] if bias_name else None)
            preconditioned = ref.dense_decoupled(rows, abar, self.damping)
            weight_shape = grads[weight_name].shape
            directions[weight_name] = preconditioned[:, : weight_shape[1:].numel()].reshape(weight_shape)
            if bias_name:
                directions[bias_name] = preconditioned[:, -1]

        with torch.no_grad():
            for name, p in named.items():
                direction = directions[name] + self.weight_decay * p
                if self.momentum:
                    buffer = self.buffers.get(name, torch.zeros_like(p))
                    direction = self.buffers[name] = self.momentum * buffer + direction
                p.sub_(self.lr * direction)
        return self.params()
