"""The MLflow pyfunc that ships a translator: source sentences in, translations out, decoded
with beam search (`beam_size`, `max_len`, `length_penalty` as MLflow inference params). The
tokenizer of training is bundled; `translate` is also what the evaluate stage scores, so the
served translations are produced exactly as the reported ones."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import mlflow.models
import mlflow.pyfunc
import pandas as pd
import torch
from tokenizers import Tokenizer

from dlpipe.formats.parallel import BOS_ID, EOS_ID, PAD_ID, decode, encode_source
from dlpipe.formats.text import texts_of
from dlpipe.models.translation import translate_ids
from dlpipe.serving import input_contract, load_artifacts

# Inference params and their defaults (the signature records them; callers override per request).
TRANSLATE_PARAMS = {"beam_size": 5, "max_len": 64, "length_penalty": 0.6}
MAX_BEAM, MAX_LEN = 32, 1024  # per request: decoding costs beam_size x max_len decoder passes
SPECIAL_IDS = {"bos_id": BOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID}


def translate(
    net: torch.nn.Module,
    tokenizer: Tokenizer,
    sentences: Sequence[str],
    source_len: int,
    beam_size: int,
    max_len: int,
    length_penalty: float,
    batch_size: int = 128,
) -> list[str]:
    """Detokenized translations of `sentences`: each encoded with `tokenizer` (cut at
    `source_len` tokens, the training max_len), decoded by beam search (beam_size 1 = greedy)
    to at most `max_len` tokens, scored with GNMT's length penalty alpha = `length_penalty`."""
    device = next(net.parameters()).device
    src = torch.from_numpy(encode_source(tokenizer, sentences, source_len)).long().to(device)
    ids = translate_ids(net, src, SPECIAL_IDS, max_len, beam_size, length_penalty, batch_size)
    return decode(tokenizer, _padded(ids))


def _padded(rows: list[list[int]]) -> torch.Tensor:
    width = max(1, *(len(r) for r in rows))
    return torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])


def translate_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """TRANSLATE_PARAMS overridden by the request's params, checked."""
    unknown = set(params or {}) - set(TRANSLATE_PARAMS)
    if unknown:
        raise ValueError(f"unknown params {sorted(unknown)}: choose from {list(TRANSLATE_PARAMS)}")
    merged = TRANSLATE_PARAMS | dict(params or {})
    beam, length, alpha = merged["beam_size"], merged["max_len"], merged["length_penalty"]
    if not 1 <= int(beam) <= MAX_BEAM:
        raise ValueError(f"beam_size={beam} must be in 1..{MAX_BEAM} (1 = greedy decoding)")
    if not 1 <= int(length) <= MAX_LEN:
        raise ValueError(f"max_len={length} must be in 1..{MAX_LEN} (tokens generated at most)")
    if not 0 <= float(alpha) <= 5:
        raise ValueError(f"length_penalty={alpha} must be in 0..5 (0 = none, 0.6 = GNMT's)")
    return {"beam_size": int(beam), "max_len": int(length), "length_penalty": float(alpha)}


class TranslatorModel(mlflow.pyfunc.PythonModel):
    """Input: source-language sentences, as a list of strings or a DataFrame column `text`
    (`{"inputs": ["Ein Hund rennt."]}` at /invocations). Params: beam_size (1 = greedy),
    max_len (tokens generated at most), length_penalty (GNMT alpha). Output: one row per
    sentence with `translation`, detokenized text."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.spec, self.net = load_artifacts(context)
        self.tokenizer = Tokenizer.from_file(context.artifacts["tokenizer"])

    @input_contract
    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        sentences = texts_of(model_input)
        settings = translate_params(params)
        source_len = self.spec["net"]["input_shape"][0]
        return pd.DataFrame(
            {"translation": translate(self.net, self.tokenizer, sentences, source_len, **settings)}
        )


# MLflow "models from code": `log_model(python_model=<this file>)` loads the model from here.
mlflow.models.set_model(TranslatorModel())
