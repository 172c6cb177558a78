"""Stage 3: the Qwen3 text decoder (q/k-norm, GQA, interleaved MRoPE, SwiGLU, deepstack injection)."""

from __future__ import annotations

import torch
from torch import nn

from qvl_pipeline.model.config import TextConfig
from qvl_pipeline.model.embedding import lookup_table
from qvl_pipeline.slots import AttentionBackend, KernelsBackend, KVCache, RotaryBackend
from qvl_pipeline.slots.kernels import DecodeStep


def text_inv_freq(cfg: TextConfig) -> torch.Tensor:
    """[head_dim / 2] fp32 rotary frequencies (always on the CPU, also when the model is built on meta)."""
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float, device="cpu")
                                 / cfg.head_dim))


class TextAttention(nn.Module):
    """Causal GQA self-attention; q and k are RMS-normalised per head before the rotary."""

    def __init__(self, cfg: TextConfig, layer: int, attention: AttentionBackend, rotary: RotaryBackend,
                 kernels: KernelsBackend) -> None:
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        bias = cfg.attention_bias
        self.q_proj = kernels.linear(cfg.hidden_size, self.heads * self.head_dim, bias)
        self.k_proj = kernels.linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias)
        self.v_proj = kernels.linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias)
        self.o_proj = kernels.linear(self.heads * self.head_dim, cfg.hidden_size, bias)
        self.q_norm = kernels.norm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = kernels.norm(cfg.head_dim, cfg.rms_norm_eps)
        self._attention = attention
        self._rotary = rotary
        self._kernels = kernels

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None) -> torch.Tensor:
        # x: [b, s, hidden]; cos, sin: [b, 1, s, head_dim]
        b, s, _ = x.shape
        q, k, v = self._kernels.project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = self.q_norm(q.view(b, s, self.heads, self.head_dim)).transpose(1, 2)          # [b, h, s, d]
        k = self.k_norm(k.view(b, s, self.kv_heads, self.head_dim)).transpose(1, 2)       # [b, kvh, s, d]
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self._rotary.apply(q, k, cos, sin, upcast=False)
        out = self._attend(q, k, v, cache)                                               # [b, s, h, d]
        return self.o_proj(out.reshape(b, s, -1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Attention of q over this step's keys/values appended to the cache; an int8 cache's rows go to the
        attention plugin unwidened (attend_int8) when they live on q's device."""
        if cache is None:
            return self._attention.attend(q, k, v, causal=True, scale=self.scale)
        rows = cache.append_int8(self.layer, k, v)                 # int8 caches: their rows [b, kvh, past + s, d]
        if rows is None:
            k, v = cache.append(self.layer, k, v)                  # [b, kvh, past + s, d]
        elif rows[0].q.device == q.device:
            return self._attention.attend_int8(q, *rows, causal=True, scale=self.scale)
        else:
            k, v = (r.dequantize() for r in rows)
        return self._attention.attend(q, k.to(q.device), v.to(q.device), causal=True, scale=self.scale)


class TextMLP(nn.Module):
    """down(act(gate(x)) · up(x))."""

    def __init__(self, cfg: TextConfig, kernels: KernelsBackend) -> None:
        super().__init__()
        self.gate_proj = kernels.linear(cfg.hidden_size, cfg.intermediate_size, False)
        self.up_proj = kernels.linear(cfg.hidden_size, cfg.intermediate_size, False)
        self.down_proj = kernels.linear(cfg.intermediate_size, cfg.hidden_size, False)
        self._act = kernels.activation(cfg.hidden_act)        # on gate's output, a temporary: may run in place
        self._kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._kernels.project(x, (self.gate_proj, self.up_proj))
        return self.down_proj(self._act(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: TextConfig, layer: int, attention: AttentionBackend, rotary: RotaryBackend,
                 kernels: KernelsBackend) -> None:
        super().__init__()
        self.self_attn = TextAttention(cfg, layer, attention, rotary, kernels)
        self.mlp = TextMLP(cfg, kernels)
        self.input_layernorm = kernels.norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = kernels.norm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None) -> torch.Tensor:
        # x: [b, s, hidden]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def add_deepstack(x: torch.Tensor, visual_mask: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """x [b, s, hidden] with feature [visual tokens, hidden] added at the positions where visual_mask [b, s]."""
    x = x.clone()
    x[visual_mask] = x[visual_mask] + feature.to(x.device, x.dtype)
    return x


class TextModel(nn.Module):
    """Embeddings, decoder layers and the final norm (the checkpoint's `model.language_model`)."""

    def __init__(self, cfg: TextConfig, *, attention: AttentionBackend, rotary: RotaryBackend,
                 kernels: KernelsBackend) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = lookup_table(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, attention, rotary, kernels)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = kernels.norm(cfg.hidden_size, cfg.rms_norm_eps)
        self._rotary = rotary
        self._inv_freq = text_inv_freq(cfg)          # plain tensor: never cast with the weights
        self.decode_step: DecodeStep | None = None   # the kernels plugin's fused step, set after each placement

    def rotary_tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [3, b, s] -> cos, sin [b, 1, s, head_dim] in `dtype` (the decoder's rule)."""
        device = self.embed_tokens.weight.device
        cos, sin = self._rotary.text_tables(position_ids.to(device), self._inv_freq.to(device),
                                            self.cfg.mrope_section)
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, cache: KVCache | None = None,
                visual_mask: torch.Tensor | None = None,
                deepstack: list[torch.Tensor] | None = None, last_only: bool = False) -> torch.Tensor:
        """inputs_embeds [b, s, hidden] -> normed hidden states [b, s, hidden] ([b, 1, hidden] when last_only);
        commits s positions to `cache`."""
        cos, sin = self.rotary_tables(position_ids, x.dtype)
        tables = {cos.device: (cos, sin)}
        taps = len(deepstack) if deepstack is not None and visual_mask is not None else 0
        fused = None
        if self.decode_step is not None and cache is not None and taps == 0 and x.shape[1] == 1:
            fused = self.decode_step(x, cos, sin, cache)          # None: this step runs layer by layer
        if fused is not None:
            x = fused
        else:
            for i, layer in enumerate(self.layers):
                device = layer.input_layernorm.weight.device
                x = x.to(device)
                if device not in tables:
                    tables[device] = (cos.to(device), sin.to(device))
                x = layer(x, *tables[device], cache)
                if i < taps:
                    x = add_deepstack(x, visual_mask.to(device), deepstack[i])
        if cache is not None:
            cache.advance(x.shape[1])
        if last_only:
            x = x[:, -1:]
        return self.norm(x.to(self.norm.weight.device))
