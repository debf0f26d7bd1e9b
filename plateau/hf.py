"""Transformer models through Hugging Face ``transformers``, with parameter-efficient training.

``trainable`` decides which tensors a client trains and releases: under client-level DP the noise
on the mean has std sigma*C/m on *every released coordinate*, so sending a head or LoRA adapters
instead of 22M weights is what makes a DP fine-tune learn at all. Frozen weights are rebuilt
identically on every side (pretrained files, or a seeded random init) and never travel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .data import DatasetInfo
from .hub import (
    HUB_TEXT_MODELS,
    TEXT_MODELS,
    VIT_HUB_ID,
    ModelError,
    check_hub_source,
    hub_failure,
    load_tokenizer,
    minilm_dir,
    quiet,
    tokenizer_source,
)

VISION_TRANSFORMERS = ("vit", "tiny-vit")
TRANSFORMERS = TEXT_MODELS + VISION_TRANSFORMERS
TRAINABLE_MODES = ("all", "head", "top-k", "lora")


class SequenceClassifier(nn.Module):
    """A ``*ForSequenceClassification`` model fed with (N, 3, L) token tensors.

    Each batch is cut to its longest sequence: sequences are padded to ``max-length`` once for
    caching, and attention over padding would only cost time.
    """

    def __init__(self, net: nn.Module, token_types: bool) -> None:
        super().__init__()
        self.net = net
        self.token_types = token_types

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = max(1, int(x[:, 1].sum(1).max()))
        inputs = {"input_ids": x[:, 0, :length], "attention_mask": x[:, 1, :length]}
        if self.token_types:
            inputs["token_type_ids"] = x[:, 2, :length]
        return self.net(**inputs).logits


class MeanPoolClassifier(nn.Module):
    """A sentence-transformer checkpoint used the way it was trained: the mean of the token
    states (its ``1_Pooling`` config), then a linear classifier. all-MiniLM-L6-v2 was never
    trained through BERT's CLS pooler: a logistic regression on its mean-pooled features reaches
    0.74 on rotten-tomatoes, on the pooler's output 0.67."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(int(encoder.config.hidden_size), num_classes)

    @property
    def base_model(self) -> nn.Module:
        """The pretrained part (everything but the classifier), as in transformers' models."""
        return self.encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> SequenceClassifierOutput:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return SequenceClassifierOutput(logits=self.classifier(pooled))


class ImageTransformer(nn.Module):
    """A ``ViTForImageClassification`` fed with the dataset's normalised images, resized to the
    model's input size and given three channels when the model expects them."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.size = int(net.config.image_size)
        self.channels = int(net.config.num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        return self.net(pixel_values=x).logits


def _tiny_bert(num_classes: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    # ~1M parameters, 98% of them in the 30,522 x 32 embedding table (MiniLM's vocabulary)
    return BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, num_labels=num_classes))


def _tiny_vit(info: DatasetInfo) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    # Initialised 10x wider than BERT's 0.02 (tuned for Adam): with the plain SGD steps every
    # algorithm here takes, the 0.02 init barely moves in a few hundred steps.
    return ViTForImageClassification(ViTConfig(
        image_size=info.image_size, patch_size=max(1, info.image_size // 4),
        num_channels=info.in_channels, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=info.num_classes,
        initializer_range=0.2))


def _pretrained(name: str, info: DatasetInfo) -> nn.Module:
    from transformers import (
        AutoModel,
        AutoModelForSequenceClassification,
        ViTForImageClassification,
    )

    source = str(minilm_dir()) if name == "minilm" else HUB_TEXT_MODELS.get(name, VIT_HUB_ID)
    check_hub_source("model", source)
    try:
        if name == "minilm":
            encoder = AutoModel.from_pretrained(source, add_pooling_layer=False)
            return MeanPoolClassifier(encoder, info.num_classes)
        if name == "vit":
            return ViTForImageClassification.from_pretrained(source, num_labels=info.num_classes)
        return AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=info.num_classes)
    except OSError as err:
        raise hub_failure("model", source, err) from None


def encoder_layers(net: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ModuleList of the base model."""
    stacks = [m for m in net.base_model.modules() if isinstance(m, nn.ModuleList)]
    if not stacks:
        raise ModelError(f"{type(net).__name__} has no stack of encoder layers")
    return max(stacks, key=len)


def head_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The task head: every parameter outside the pretrained base model (BERT, ViT:
    ``classifier``; RoBERTa: ``classifier.dense`` + ``out_proj``), as peft's SEQ_CLS keeps it.

    BERT's pooler stays frozen here: trained, it would add 148k released coordinates to
    MiniLM's 770, and under DP every coordinate costs noise."""
    base = {id(p) for p in net.base_model.parameters()}
    return [p for p in net.parameters() if id(p) not in base]


def _top_k_parameters(net: nn.Module, k: int) -> list[nn.Parameter]:
    """The last k encoder layers, whatever follows the encoder (pooler, final LayerNorm) and
    the head: everything but the embeddings and the first layers."""
    layers = encoder_layers(net)
    if k > len(layers):
        raise ModelError(f"trainable-layers={k} is not allowed for this model; expected <= "
                         f"{len(layers)} (its encoder layers)")
    frozen = {id(p) for layer in layers[: len(layers) - k] for p in layer.parameters()}
    frozen |= {id(p) for name, p in net.base_model.named_parameters()
               if name.startswith("embeddings.")}
    return [p for p in net.parameters() if id(p) not in frozen]


def _add_lora(net: nn.Module, rank: int, alpha: float, targets: str) -> nn.Module:
    """LoRA adapters (peft) on the target modules; the head stays trainable, all else frozen."""
    import peft

    head = head_parameters(net)
    try:
        wrapped = peft.get_peft_model(net, peft.LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
            target_modules=[t.strip() for t in targets.split(",") if t.strip()]))
    except ValueError as err:
        raise ModelError(f"lora-targets={targets!r} is not allowed for this model: "
                         f"{str(err).splitlines()[0][:200]}") from None
    for p in head:
        p.requires_grad_(True)
    return wrapped


def build_transformer(name: str, info: DatasetInfo, *, trainable: str = "all",
                      trainable_layers: int = 2, lora_rank: int = 8, lora_alpha: float = 16.0,
                      lora_targets: str = "query,value") -> nn.Module:
    """A transformer for ``info`` with only the ``trainable`` part requiring gradients.

    The caller seeds the RNG: randomly initialised parts (tiny models, heads, LoRA A) must come
    out the same on the server and every client.
    """
    quiet()
    text = name in TEXT_MODELS
    if text != (info.kind == "text"):
        raise ModelError(f"model={name!r} does not read {info.kind} data ({info.name!r}); "
                         f"text models: {', '.join(TEXT_MODELS)}; image transformers: "
                         f"{', '.join(VISION_TRANSFORMERS)}")
    if name == "tiny-bert":
        net = _tiny_bert(info.num_classes)
    elif name == "tiny-vit":
        net = _tiny_vit(info)
    else:
        net = _pretrained(name, info)
    if trainable == "lora":
        net = _add_lora(net, lora_rank, lora_alpha, lora_targets)
    elif trainable != "all":
        keep = {id(p) for p in (head_parameters(net) if trainable == "head"
                                else _top_k_parameters(net, trainable_layers))}
        for p in net.parameters():
            p.requires_grad_(id(p) in keep)
    if not text:
        return ImageTransformer(net)
    uses_types = "token_type_ids" in load_tokenizer(tokenizer_source(name)).model_input_names
    return SequenceClassifier(net, token_types=uses_types)
