"""A small PyTorch Baichuan 2 to test against: transformers does not ship it.

Written from the modeling_baichuan.py that Baichuan publishes with its checkpoints
(baichuan-inc/Baichuan2-7B-Base and Baichuan2-13B-Base): fused W_pack q/k/v projection, RMSNorm,
SwiGLU MLP, NormHead (each lm_head row L2-normalized), and rotary positions (7B) or ALiBi (13B).
ALiBi follows `_gen_alibi_mask`, the inference path: bias slope · key_position with -inf above
the diagonal. Tensor names are the published ones, so `save`/`load` read and write Hugging Face folders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


def _get_interleave(n):
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _get_interleave(2 * closest)[0::2][: n - closest]


def _gen_alibi_mask(n_head, max_pos):
    slopes = torch.Tensor(_get_interleave(n_head))
    position_point = torch.arange(max_pos) - max_pos + 1
    position_point = position_point.unsqueeze(0).unsqueeze(0).expand(n_head, -1, -1)
    diag = torch.diag(position_point[0])
    position_point = position_point - diag.unsqueeze(0).unsqueeze(0).transpose(-1, -2)
    alibi = slopes.unsqueeze(1).unsqueeze(1) * position_point
    alibi = alibi.view(n_head, 1, max_pos)
    alibi_mask = torch.triu(torch.zeros([max_pos, max_pos]).fill_(float("-inf")), 1)
    return alibi_mask.unsqueeze(0) + alibi


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, epsilon):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.epsilon = epsilon

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.epsilon))


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.hidden_size, self.num_heads = config["hidden_size"], config["num_attention_heads"]
        self.head_dim = self.hidden_size // self.num_heads
        self.W_pack = nn.Linear(self.hidden_size, 3 * self.hidden_size, bias=False)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask, rotary):
        bsz, q_len, _ = hidden_states.size()
        proj = self.W_pack(hidden_states)
        proj = proj.unflatten(-1, (3, self.hidden_size)).unsqueeze(0).transpose(0, -2).squeeze(-2)
        q, k, v = (proj[i].view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2) for i in range(3))
        if rotary is not None:
            cos, sin = rotary
            q = (q.float() * cos) + (_rotate_half(q.float()) * sin)
            k = (k.float() * cos) + (_rotate_half(k.float()) * sin)
        attn_weights = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        attn_weights = attn_weights + attention_mask
        attn_weights = torch.max(attn_weights, torch.tensor(torch.finfo(attn_weights.dtype).min))
        attn_output = torch.matmul(torch.softmax(attn_weights, dim=-1), v)
        return self.o_proj(attn_output.transpose(1, 2).reshape(bsz, q_len, self.hidden_size))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, intermediate = config["hidden_size"], config["intermediate_size"]
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config["hidden_size"], config["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(config["hidden_size"], config["rms_norm_eps"])

    def forward(self, hidden_states, attention_mask, rotary):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask, rotary)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config["vocab_size"], config["hidden_size"])
        self.layers = nn.ModuleList([Layer(config) for _ in range(config["num_hidden_layers"])])
        self.norm = RMSNorm(config["hidden_size"], config["rms_norm_eps"])


class NormHead(nn.Module):
    def __init__(self, hidden_size, vocab_size):
        super().__init__()
        self.weight = nn.Parameter(torch.empty((vocab_size, hidden_size)))

    def forward(self, hidden_states):
        return F.linear(hidden_states, F.normalize(self.weight))


class BaichuanForCausalLM(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.model = Model(config)
        self.lm_head = NormHead(config["hidden_size"], config["vocab_size"])
        # Baichuan ships two modeling files (7B: rotary, 13B: ALiBi); here config.json picks one, and
        # without "position_embedding" the one its hidden_size implies (4096: the 7B).
        default = "rope" if config["hidden_size"] == 4096 else "alibi"
        self.alibi = config.get("position_embedding", default) == "alibi"

    def forward(self, input_ids):
        c, length = self.config, input_ids.shape[1]
        heads, head_dim = c["num_attention_heads"], c["hidden_size"] // c["num_attention_heads"]
        rotary = None
        if self.alibi:
            mask = _gen_alibi_mask(heads, c["model_max_length"])[:, :length, :length]
        else:
            mask = torch.triu(torch.full((length, length), float("-inf")), 1)
            inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
            freqs = torch.einsum("i,j->ij", torch.arange(length).float(), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            rotary = (emb.cos()[None, None], emb.sin()[None, None])
        hidden_states = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            hidden_states = layer(hidden_states, mask, rotary)
        return self.lm_head(self.model.norm(hidden_states))

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(self.config))

    @classmethod
    def load(cls, path: Path) -> BaichuanForCausalLM:
        model = cls(json.loads((path / "config.json").read_text()))
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model.eval()
