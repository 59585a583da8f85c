"""Deterministic test models, their batches and the per-rank split of a global batch.

Every factory takes a seed, builds on CPU in fp32 and gives bit-identical weights for the same seed in any process.
A batch is a dict {"args": [positional inputs], "kwargs": {keyword inputs}}; every tensor in it has the batch as
dim 0. All model losses are per-sample means (each sample contributes the same number of loss terms), which is the
semantics rannc assumes for 0-dim outputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn

transformers.logging.set_verbosity_error()

Batch = dict[str, Any]  # {"args": list[Any], "kwargs": dict[str, Any]}

MODEL_NAMES = ("mlp", "skip_tied", "bert", "gpt2", "llama", "t5", "falcon", "bloom", "bart", "vit", "mixtral")

# Sizes of the inputs (kept tiny: the equivalence tests run 4 ranks on 2 CPU cores).
MLP_IN, MLP_WIDTH, MLP_OUT, MLP_LINEARS = 16, 32, 4, 6
SKIP_VOCAB, SKIP_DIM, SKIP_SEQ, SKIP_MAX_SEQ, SKIP_LAYERS = 64, 32, 8, 16, 8
HF_VOCAB, HF_SEQ = 512, 16


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """6 Linear layers (width 32) with GELU; forward(x, y) -> scalar MSE loss."""

    def __init__(self) -> None:
        super().__init__()
        dims = [MLP_IN] + [MLP_WIDTH] * (MLP_LINEARS - 1) + [MLP_OUT]
        layers: list[nn.Module] = []
        for index in range(MLP_LINEARS):
            layers.append(nn.Linear(dims[index], dims[index + 1]))
            if index < MLP_LINEARS - 1:
                layers.append(nn.GELU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.net(x), y)


class SkipTiedModel(nn.Module):
    """A non-sequential model: two inputs, a tied embedding/output projection, a long skip connection, a buffer
    used in forward, and two outputs (a scalar loss and batch-shaped logits).

    forward(ids [B, T] int64, x [B, T, D] float, labels [B, T] int64) -> (loss, logits [B, T, V])
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(SKIP_VOCAB, SKIP_DIM)
        # A fixed sinusoidal positional table: a (persistent) buffer, not a parameter.
        position = torch.arange(SKIP_MAX_SEQ, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, SKIP_DIM, 2, dtype=torch.float32) * (-4.0 / SKIP_DIM))
        table = torch.zeros(SKIP_MAX_SEQ, SKIP_DIM)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)
        self.register_buffer("pos_table", table)
        self.in_proj = nn.Linear(SKIP_DIM, SKIP_DIM)
        self.layers = nn.ModuleList(nn.Linear(SKIP_DIM, SKIP_DIM) for _ in range(SKIP_LAYERS))
        self.skip_proj = nn.Linear(SKIP_DIM, SKIP_DIM)  # applied to an early activation, added late
        self.norm = nn.LayerNorm(SKIP_DIM)
        self.head = nn.Linear(SKIP_DIM, SKIP_VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied
        nn.init.normal_(self.embed.weight, std=0.1)  # keeps the initial logits (and loss ~ log V) moderate

    def forward(
        self, ids: torch.Tensor, x: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq = ids.shape[1]
        h = self.embed(ids) + self.in_proj(x) + self.pos_table[:seq]
        skip = h
        for index, layer in enumerate(self.layers):
            h = h + F.gelu(layer(h))
            if index == 1:
                skip = h  # leaves after the second layer ...
            if index == SKIP_LAYERS - 2:
                h = h + self.skip_proj(skip)  # ... and comes back before the last one
        logits = self.head(self.norm(h))
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return loss, logits


def mlp(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def skip_tied(seed: int) -> SkipTiedModel:
    torch.manual_seed(seed)
    return SkipTiedModel()


# Small sizes in the names most Hugging Face configs use; no dropout anywhere (the comparisons are exact).
_SIZES = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4)
_SEQ2SEQ_SIZES = dict(
    encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4
)
VIT_IMAGE, VIT_CLASSES = 16, 10


def _hugging_face(model_class: str, config_class: str, seed: int, **config: Any) -> nn.Module:
    """transformers' `model_class` of `config_class(**config)`, weights from `seed`."""
    built = getattr(transformers, config_class)(**config)
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(built)


def bert(seed: int) -> nn.Module:
    size = dict(vocab_size=HF_VOCAB, **_SIZES, intermediate_size=128, max_position_embeddings=64)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _hugging_face("BertForPreTraining", "BertConfig", seed, **size, **no_dropout)


def gpt2(seed: int) -> nn.Module:
    size = dict(vocab_size=HF_VOCAB, n_positions=64, n_embd=64, n_layer=4, n_head=4)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _hugging_face("GPT2LMHeadModel", "GPT2Config", seed, **size, **no_dropout, use_cache=False)


def llama(seed: int) -> nn.Module:
    """A Llama-architecture model: rotary positions, grouped-query attention (4 heads sharing 2 key/value heads),
    RMSNorm and a gated SiLU feed-forward, with an untied head."""
    size = dict(vocab_size=HF_VOCAB, **_SIZES, intermediate_size=128, max_position_embeddings=HF_SEQ)
    shape = dict(num_key_value_heads=2, tie_word_embeddings=False)
    return _hugging_face("LlamaForCausalLM", "LlamaConfig", seed, **size, **shape, use_cache=False)


def t5(seed: int) -> nn.Module:
    """An encoder-decoder: the encoder's output feeds the cross-attention of every decoder layer, so it crosses
    every later stage boundary; embeddings are shared by encoder, decoder and head."""
    size = dict(
        vocab_size=HF_VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4
    )
    tokens = dict(decoder_start_token_id=0, pad_token_id=0)
    return _hugging_face(
        "T5ForConditionalGeneration", "T5Config", seed, **size, **tokens, dropout_rate=0.0, use_cache=False
    )


def falcon(seed: int) -> nn.Module:
    """Falcon: one fused query/key/value projection split by list indices, multi-query attention, parallel
    attention and MLP."""
    config = dict(vocab_size=HF_VOCAB, **_SIZES, hidden_dropout=0.0, attention_dropout=0.0, use_cache=False)
    return _hugging_face("FalconForCausalLM", "FalconConfig", seed, **config)


def bloom(seed: int) -> nn.Module:
    """BLOOM: ALiBi position biases built from the attention mask, embedding layer norm, tied head."""
    config = dict(vocab_size=HF_VOCAB, **_SIZES, hidden_dropout=0.0, attention_dropout=0.0, use_cache=False)
    return _hugging_face("BloomForCausalLM", "BloomConfig", seed, **config)


def bart(seed: int) -> nn.Module:
    """BART: an encoder-decoder with learned positions and a final logits bias buffer."""
    size = dict(
        vocab_size=HF_VOCAB,
        d_model=64,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=HF_SEQ,
    )
    no_dropout = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    config = dict(**_SEQ2SEQ_SIZES, **size, **no_dropout, use_cache=False)
    return _hugging_face("BartForConditionalGeneration", "BartConfig", seed, **config)


def vit(seed: int) -> nn.Module:
    """A vision transformer: float pixel input, convolutional patch embedding, class token, classifier."""
    image = dict(image_size=VIT_IMAGE, patch_size=4, num_labels=VIT_CLASSES, intermediate_size=128)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _hugging_face("ViTForImageClassification", "ViTConfig", seed, **_SIZES, **image, **no_dropout)


def mixtral(seed: int) -> nn.Module:
    """A mixture of experts: each token routed to 2 of 4 expert MLPs by a learned router (data-dependent)."""
    size = dict(vocab_size=HF_VOCAB, **_SIZES, intermediate_size=128, max_position_embeddings=HF_SEQ)
    experts = dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2)
    return _hugging_face("MixtralForCausalLM", "MixtralConfig", seed, **size, **experts, use_cache=False)


FACTORIES: dict[str, Callable[[int], nn.Module]] = {
    "mlp": mlp,
    "skip_tied": skip_tied,
    "bert": bert,
    "gpt2": gpt2,
    "llama": llama,
    "t5": t5,
    "falcon": falcon,
    "bloom": bloom,
    "bart": bart,
    "vit": vit,
    "mixtral": mixtral,
}


def build(name: str, seed: int) -> nn.Module:
    """The named model with weights from `seed`, in train mode (no dropout is configured anywhere)."""
    model = FACTORIES[name](seed)
    model.train()
    return model


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer named `name`: SGD with momentum 0.9 ("sgd") or AdamW with its defaults ("adamw")."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; use 'sgd' or 'adamw'")


def forced_plan(stages: int, microbatches: int = 2, **items: Any) -> dict[str, Any]:
    """RaNNCModule keyword arguments of a test job: `stages` pipeline stages of `microbatches` microbatches
    (the planner searches only the replicas), one profiling repetition, no progress display, and the further
    config `items`, e.g. ``rannc.RaNNCModule(model, optimizer, **forced_plan(2, profile_cache_dir=cache))``."""
    return dict(
        partition_num=stages,
        min_pipeline=microbatches,
        max_pipeline=microbatches,
        profile_iterations=1,
        show_progress=False,
        **items,
    )


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


def get_loss(name: str, out: Any) -> torch.Tensor:
    """The scalar loss in the output of model `name`."""
    if name == "mlp":
        return out
    if name == "skip_tied":
        return out[0]
    return out.loss


def batch_outputs(name: str, out: Any) -> dict[str, torch.Tensor]:
    """The batch-shaped tensors in the output of model `name` (each rank gets its own rows of these)."""
    if name == "mlp":
        return {}
    if name == "skip_tied":
        return {"logits": out[1]}
    if name == "bert":
        return {
            "prediction_logits": out.prediction_logits,
            "seq_relationship_logits": out.seq_relationship_logits,
        }
    if name in ("t5", "bart"):
        return {"logits": out.logits, "encoder_last_hidden_state": out.encoder_last_hidden_state}
    return {"logits": out.logits}


def output_structure(out: Any) -> Any:
    """A picklable description of an output's container structure: type names, lengths and keys, recursively."""
    if isinstance(out, torch.Tensor):
        return ("Tensor", out.dim())
    if isinstance(out, dict):  # includes transformers' ModelOutput
        return (type(out).__name__, tuple((key, output_structure(value)) for key, value in out.items()))
    if isinstance(out, tuple | list):
        return (type(out).__name__, tuple(output_structure(value) for value in out))
    return (type(out).__name__,)


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------


def _one_batch(name: str, generator: torch.Generator, rows: int) -> Batch:
    def randint(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=generator, dtype=torch.int64)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float32)

    if name == "mlp":
        return {"args": [randn(rows, MLP_IN), randn(rows, MLP_OUT)], "kwargs": {}}
    if name == "skip_tied":
        ids = randint(SKIP_VOCAB, rows, SKIP_SEQ)
        x = randn(rows, SKIP_SEQ, SKIP_DIM)
        labels = randint(SKIP_VOCAB, rows, SKIP_SEQ)
        return {"args": [ids, x, labels], "kwargs": {}}
    if name == "bert":
        token_type_ids = torch.zeros(rows, HF_SEQ, dtype=torch.int64)
        token_type_ids[:, HF_SEQ // 2 :] = 1
        return {
            "args": [],
            "kwargs": {
                "input_ids": randint(HF_VOCAB, rows, HF_SEQ),
                "token_type_ids": token_type_ids,
                "attention_mask": torch.ones(rows, HF_SEQ, dtype=torch.int64),
                # every position labelled (no -100): the MLM mean is a per-sample mean
                "labels": randint(HF_VOCAB, rows, HF_SEQ),
                "next_sentence_label": randint(2, rows),
            },
        }
    if name in ("gpt2", "llama", "falcon", "bloom", "mixtral"):
        ids = randint(HF_VOCAB, rows, HF_SEQ)
        # labels are the ids (the model shifts them), passed as a separate tensor
        return {"args": [], "kwargs": {"input_ids": ids, "labels": ids.clone()}}
    if name == "vit":
        pixels = randn(rows, 3, VIT_IMAGE, VIT_IMAGE)
        return {"args": [], "kwargs": {"pixel_values": pixels, "labels": randint(VIT_CLASSES, rows)}}
    if name in ("t5", "bart"):
        # labels from 1: no -100 / padding, every target position counts
        ids, labels = randint(HF_VOCAB, rows, HF_SEQ), 1 + randint(HF_VOCAB - 1, rows, HF_SEQ // 2)
        return {"args": [], "kwargs": {"input_ids": ids, "labels": labels}}
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")


def make_batches(name: str, seed: int, steps: int, global_batch: int) -> list[Batch]:
    """`steps` deterministic global batches of `global_batch` rows for model `name` (independent of global RNG)."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    return [_one_batch(name, generator, global_batch) for _ in range(steps)]


def row_range(rows: int, part: int, parts: int) -> tuple[int, int]:
    """[start, end) of part `part` of `rows` rows split into `parts` near-equal contiguous parts (the first ones
    get the extra rows)."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is not in [0, {parts})")
    base, extra = divmod(rows, parts)
    start = part * base + min(part, extra)
    return start, start + base + (1 if part < extra else 0)


def batch_rows(batch: Batch) -> int:
    sizes = {value.shape[0] for value in _tensors(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def slice_rows(batch: Batch, start: int, end: int) -> Batch:
    """Rows [start, end) of every tensor in the batch (cloned, so that each slice is an independent leaf)."""

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value[start:end].clone()
        return value

    return {
        "args": [cut(v) for v in batch["args"]],
        "kwargs": {k: cut(v) for k, v in batch["kwargs"].items()},
    }


def local_slice(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank `rank`'s part of a global batch: near-equal contiguous rows, first ranks get the extra rows."""
    start, end = row_range(batch_rows(batch), rank, world_size)
    return slice_rows(batch, start, end)


def _tensors(batch: Batch) -> list[torch.Tensor]:
    values = list(batch["args"]) + list(batch["kwargs"].values())
    return [v for v in values if isinstance(v, torch.Tensor) and v.dim() >= 1]


def call(model: Callable[..., Any], batch: Batch) -> Any:
    return model(*batch["args"], **batch["kwargs"])


# Where the float input that can require grad sits in each model's batch (for the input-gradient tests).
INPUT_GRAD_LOCATION: dict[str, tuple[str, int | str]] = {
    "mlp": ("args", 0),
    "skip_tied": ("args", 1),
    "vit": ("kwargs", "pixel_values"),
}


def batch_input(batch: Batch, location: tuple[str, int | str]) -> torch.Tensor:
    kind, key = location
    value = batch["args"][int(key)] if kind == "args" else batch["kwargs"][str(key)]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"batch input at {location} is a {type(value).__name__}, not a tensor")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face models as users build them
# ----------------------------------------------------------------------------------------------------------------

# name -> (model class, config class, the config fields set): sizes, no dropout (the comparisons are exact) and
# T5's decoder start token (needed for a loss); everything else, use_cache=True and return_dict=True included, is
# the config's default, as in every `from_pretrained` model.
AS_USERS_BUILD: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert": (
        "BertForPreTraining",
        "BertConfig",
        dict(vocab_size=HF_VOCAB, **_SIZES, intermediate_size=128, max_position_embeddings=64)
        | dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        dict(vocab_size=HF_VOCAB, n_positions=64, n_embd=64, n_layer=4, n_head=4)
        | dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    ),
    "llama": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(vocab_size=HF_VOCAB, **_SIZES, intermediate_size=128, max_position_embeddings=HF_SEQ),
    ),
    "t5": (
        "T5ForConditionalGeneration",
        "T5Config",
        dict(
            vocab_size=HF_VOCAB,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
        )
        | dict(dropout_rate=0.0, decoder_start_token_id=0),
    ),
}


def as_users_build(name: str, seed: int) -> nn.Module:
    """Hugging Face model `name` (a key of AS_USERS_BUILD) from its config's defaults, in train mode; it takes
    `make_batches(name, ...)`."""
    model_class, config_class, fields = AS_USERS_BUILD[name]
    model = _hugging_face(model_class, config_class, seed, **fields)
    model.train()
    return model
