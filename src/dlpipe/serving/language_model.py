"""The MLflow pyfunc that ships a character-level language model: prompts in, generated text out,
with the sampling settings as MLflow inference params. `generate` is also what training samples
and evaluation use, so the served text is produced exactly as the reports show it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from dlpipe.serving import input_contract, load_artifacts

# Inference params and their defaults (the signature records them; callers override per request).
GENERATION_PARAMS = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 0, "seed": 0}
MAX_NEW_TOKENS = 10_000  # per request: generation is one forward pass per character


@torch.inference_mode()
def generate(
    net: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    block_size: int,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue each row of `idx` (B, T) by `max_new_tokens` sampled tokens; returns (B, T + new).

    The context is cropped to the last `block_size` tokens (the model's window). `top_k` > 0
    samples among the k most likely tokens only, so top_k=1 is greedy decoding."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0; for greedy decoding use top_k=1")
    for _ in range(max_new_tokens):
        logits = net(idx[:, -block_size:])[:, -1, :].float() / temperature  # (B, V)
        if top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        next_id = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, next_id], dim=1)
    return idx


def encode_prompt(prompt: str, chars: str) -> list[int]:
    unseen = sorted(set(prompt) - set(chars))
    if unseen:
        raise ValueError(
            f"prompt {prompt[:40]!r} has characters the model never saw in training: {unseen}. "
            f"Remove or replace them; the vocabulary is {chars!r}"
        )
    if not prompt:
        raise ValueError("empty prompt: give at least one character to continue, e.g. '\\n'")
    index = {c: i for i, c in enumerate(chars)}
    return [index[c] for c in prompt]


def complete(
    net: torch.nn.Module,
    prompts: Sequence[str],
    chars: str,
    block_size: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
) -> list[str]:
    """The `max_new_tokens` characters generated after each prompt. Prompts of equal length
    are generated as one batch (rows need equal lengths, and padding would shift positions)."""
    device = next(net.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    encoded = [encode_prompt(p, chars) for p in prompts]
    completions: list[str] = [""] * len(prompts)
    for length in dict.fromkeys(len(ids) for ids in encoded):  # in order of first appearance
        rows = [i for i, ids in enumerate(encoded) if len(ids) == length]
        idx = torch.tensor([encoded[i] for i in rows], device=device)
        out = generate(net, idx, max_new_tokens, block_size, temperature, top_k, generator)
        for i, ids in zip(rows, out[:, length:].tolist(), strict=True):
            completions[i] = "".join(chars[t] for t in ids)
    return completions


def prompts_of(model_input: Any) -> list[str]:
    """Prompts from a list of strings, one string, or a DataFrame with a `prompt` column (or a
    single column, which is what MLflow makes of a list at /invocations)."""
    if isinstance(model_input, pd.DataFrame):
        if "prompt" in model_input.columns:
            model_input = model_input["prompt"]
        elif len(model_input.columns) == 1:
            model_input = model_input.iloc[:, 0]
        else:
            raise ValueError(
                f"expected a DataFrame with a 'prompt' column, got columns {list(model_input)}"
            )
    if isinstance(model_input, str):
        model_input = [model_input]
    prompts = list(
        model_input.tolist() if isinstance(model_input, pd.Series | np.ndarray) else model_input
    )
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("expected prompts as strings, e.g. ['ROMEO:', 'JULIET:']")
    return prompts


def generation_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """GENERATION_PARAMS overridden by the request's params, checked."""
    unknown = set(params or {}) - set(GENERATION_PARAMS)
    if unknown:
        raise ValueError(f"unknown params {sorted(unknown)}: choose from {list(GENERATION_PARAMS)}")
    merged = GENERATION_PARAMS | dict(params or {})
    if not 0 < int(merged["max_new_tokens"]) <= MAX_NEW_TOKENS:
        raise ValueError(
            f"max_new_tokens={merged['max_new_tokens']} must be in 1..{MAX_NEW_TOKENS}"
        )
    if int(merged["top_k"]) < 0:
        raise ValueError(f"top_k={merged['top_k']} must be >= 0 (0 = sample from all tokens)")
    return {
        "max_new_tokens": int(merged["max_new_tokens"]),
        "temperature": float(merged["temperature"]),
        "top_k": int(merged["top_k"]),
        "seed": int(merged["seed"]),
    }


class LanguageModel(mlflow.pyfunc.PythonModel):
    """Input: prompts, as a list of strings or a DataFrame column `prompt` (`{"inputs":
    ["ROMEO:"]}` at /invocations). Params: max_new_tokens, temperature, top_k (0 = off, 1 =
    greedy), seed (same seed and inputs, same text). Output: one row per prompt with
    `completion`, the max_new_tokens characters generated after it."""

    _skip_type_hint_validation = True  # our own input contract (see AdaptedModel)

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.spec, self.net = load_artifacts(context)

    @input_contract
    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        prompts = prompts_of(model_input)
        settings = generation_params(params)
        completions = complete(
            self.net, prompts, self.spec["chars"], self.spec["block_size"], **settings
        )
        return pd.DataFrame({"completion": completions})


# MLflow "models from code": `log_model(python_model=<this file>)` loads the model from here.
mlflow.models.set_model(LanguageModel())
