"""Text prompts to CLIP embeddings for the Stable Diffusion family (transformers CLIPTextModel/CLIPTokenizer).

Two ways to encode text:

* the default (the reference's): each prompt is tokenized, padded to ``tokenizer.model_max_length``
  (77) and cut there; what was cut is logged as a warning;
* ``prompt_weighting="a1111"`` (opt-in, not in the reference): attention weights in the prompt and no
  length limit, see :func:`encode_weighted_text`.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Sequence

import torch

from .call_checks import check_prompt_text

logger = logging.getLogger(__name__)

PROMPT_WEIGHTINGS = (None, "a1111")
#: Fast (Rust) tokenizers keep their padding and truncation settings on the shared object, so calls
#: from several threads with different settings would mix them up: tokenizer calls hold this lock.
TOKENIZER_LOCK = threading.RLock()


def prompt_batch_size(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
    """Number of prompts: 1 for a string, the list length, else the embeddings' batch size."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    return prompt_embeds.shape[0]


def check_prompt_inputs(prompt, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                        prompt_weighting: str | None = None) -> None:
    """The argument checks every text-conditioned pipeline makes before encoding (ValueError)."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass either prompt or prompt_embeds, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("pass prompt or prompt_embeds; both are None")
    check_prompt_text("prompt", prompt)
    check_prompt_text("negative_prompt", negative_prompt)
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
    if prompt_embeds is not None and negative_prompt_embeds is not None:
        if prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(
                f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
            )
    if prompt_weighting not in PROMPT_WEIGHTINGS:
        raise ValueError(f"prompt_weighting must be one of {PROMPT_WEIGHTINGS}, got {prompt_weighting!r}")


def negative_texts(negative_prompt, prompt, batch_size: int) -> list[str]:
    """The unconditional texts: ``""`` per prompt, or ``negative_prompt`` checked against ``prompt``."""
    if negative_prompt is None:
        return [""] * batch_size
    if prompt is not None and type(prompt) is not type(negative_prompt):
        raise TypeError(
            f"negative_prompt must have the type of prompt ({type(prompt).__name__}), "
            f"got {type(negative_prompt).__name__}"
        )
    if isinstance(negative_prompt, str):
        return [negative_prompt]
    if len(negative_prompt) != batch_size:
        raise ValueError(
            f"negative_prompt holds {len(negative_prompt)} prompts but prompt holds {batch_size}; "
            "they must match"
        )
    return list(negative_prompt)


# -- the reference's encoding ------------------------------------------------------------------


def tokenize(tokenizer, texts: list[str], max_length: int | None = None, warn: bool = True,
             encoder_name: str = "CLIP"):
    """Tokenize padded and cut to ``max_length`` (default ``tokenizer.model_max_length``).

    With ``warn``, logs the text that did not fit, as decoded by the tokenizer (the message names
    ``encoder_name``).
    """
    max_length = max_length or tokenizer.model_max_length
    with TOKENIZER_LOCK:
        inputs = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        full = tokenizer(texts, padding="longest", return_tensors="pt").input_ids if warn else None
        if warn and full.shape[-1] >= inputs.input_ids.shape[-1] and not torch.equal(full, inputs.input_ids):
            removed = tokenizer.batch_decode(full[:, max_length - 1 : -1])
            logger.warning(
                "The following part of your input was truncated because %s can only handle sequences up to "
                "%d tokens: %s", encoder_name, max_length, removed,
            )
    return inputs


def run_text_encoder(text_encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     clip_skip: int | None = None, penultimate: bool = False) -> torch.Tensor:
    """Token ids to hidden states: the last layer's, or with ``clip_skip = k`` the output of the
    k-th layer from the end passed through the final layer norm (k = 1: the penultimate layer).
    ``penultimate`` (SDXL): the output of layer ``k + 1`` from the end (k = 0 by default: the
    penultimate layer), without the final layer norm."""
    device = text_encoder.device
    mask = attention_mask.to(device) if attention_mask is not None else None
    if penultimate:
        out = text_encoder(input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[-((clip_skip or 0) + 2)]
    if clip_skip is None:
        return text_encoder(input_ids.to(device), attention_mask=mask)[0]
    out = text_encoder(input_ids.to(device), attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states[-(clip_skip + 1)]
    # transformers < 5 wraps the layers in ``.text_model``; 5 keeps them on the model itself
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


def _attention_mask(text_encoder, inputs) -> torch.Tensor | None:
    return inputs.attention_mask if getattr(text_encoder.config, "use_attention_mask", False) else None


def _repeat_per_image(embeds: torch.Tensor, num_images_per_prompt: int) -> torch.Tensor:
    batch, seq_len, _ = embeds.shape
    return embeds.repeat(1, num_images_per_prompt, 1).view(batch * num_images_per_prompt, seq_len, -1)


def encode_prompt(
    text_encoder,
    tokenizer,
    prompt: str | list[str] | None,
    device: torch.device | str,
    num_images_per_prompt: int = 1,
    do_classifier_free_guidance: bool = True,
    negative_prompt: str | list[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    clip_skip: int | None = None,
    prompt_weighting: str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embeddings for ``prompt`` and (with guidance) ``negative_prompt``, each repeated per image.

    Returns ``(prompt_embeds, negative_prompt_embeds)``, shaped (batch * num_images_per_prompt,
    tokens, dim); the second is None without guidance. Given embeddings are used as they are. They
    are cast to the text encoder's dtype (``dtype`` when there is no text encoder).

    As in the reference, ``clip_skip`` applies to the prompt only, not to the negative prompt; with
    ``prompt_weighting="a1111"`` it applies to both.
    """
    if prompt_weighting not in PROMPT_WEIGHTINGS:
        raise ValueError(f"prompt_weighting must be one of {PROMPT_WEIGHTINGS}, got {prompt_weighting!r}")
    batch_size = prompt_batch_size(prompt, prompt_embeds)
    texts = [prompt] if isinstance(prompt, str) else prompt
    uncond_texts = None
    if do_classifier_free_guidance and negative_prompt_embeds is None:
        uncond_texts = negative_texts(negative_prompt, prompt, batch_size)

    if prompt_weighting == "a1111":
        prompt_embeds, negative_prompt_embeds = _encode_weighted_pair(
            text_encoder, tokenizer, texts, uncond_texts, prompt_embeds, negative_prompt_embeds, clip_skip
        )
    else:
        if prompt_embeds is None:
            inputs = tokenize(tokenizer, texts)
            prompt_embeds = run_text_encoder(text_encoder, inputs.input_ids, _attention_mask(text_encoder, inputs),
                                             clip_skip)
        if uncond_texts is not None:
            inputs = tokenize(tokenizer, uncond_texts, max_length=prompt_embeds.shape[1], warn=False)
            negative_prompt_embeds = run_text_encoder(text_encoder, inputs.input_ids,
                                                      _attention_mask(text_encoder, inputs))

    if text_encoder is not None:
        dtype = text_encoder.dtype
    dtype = dtype or prompt_embeds.dtype
    prompt_embeds = _repeat_per_image(prompt_embeds.to(dtype=dtype, device=device), num_images_per_prompt)
    if not do_classifier_free_guidance:
        return prompt_embeds, None
    negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
    return prompt_embeds, _repeat_per_image(negative_prompt_embeds, num_images_per_prompt)


# -- A1111-style prompt weighting ----------------------------------------------------------------

ROUND_BRACKET_WEIGHT = 1.1
_ATTENTION_TOKENS = re.compile(
    r"\\[()\[\]\\]"                       # escaped bracket or backslash: literal text
    r"|:\s*([+-]?[.\d]+)\s*\)"            # ":1.3)" closes a round bracket with an explicit weight
    r"|[()\[\]]"                          # brackets
    r"|[^\\()\[\]:]+|[:\\]"               # plain text, a lone colon or backslash
)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111-style prompt into ``(text, weight)`` runs.

    ``(words)`` multiplies the weight by 1.1, ``[words]`` divides it by 1.1 and ``(words:1.3)``
    multiplies it by 1.3; brackets nest (``((a))`` -> 1.21). ``\\(``, ``\\)``, ``\\[``, ``\\]`` are
    literal brackets. Brackets left open apply to the end of the prompt; an unmatched closing bracket
    is literal text. Neighbouring runs of equal weight are merged; an empty prompt gives ``[("", 1.0)]``.
    """
    runs: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION_TOKENS.finditer(text):
        piece, explicit = match.group(0), match.group(1)
        if piece.startswith("\\") and len(piece) == 2:
            runs.append([piece[1], 1.0])
        elif piece == "(":
            open_round.append(len(runs))
        elif piece == "[":
            open_square.append(len(runs))
        elif explicit is not None and open_round:
            scale_from(open_round.pop(), float(explicit))
        elif piece == ")" and open_round:
            scale_from(open_round.pop(), ROUND_BRACKET_WEIGHT)
        elif piece == "]" and open_square:
            scale_from(open_square.pop(), 1 / ROUND_BRACKET_WEIGHT)
        else:
            runs.append([piece, 1.0])
    for start in open_round:
        scale_from(start, ROUND_BRACKET_WEIGHT)
    for start in open_square:
        scale_from(start, 1 / ROUND_BRACKET_WEIGHT)

    merged: list[list] = []
    for run in runs:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(list(run))
    return [(t, w) for t, w in merged] or [("", 1.0)]


def weighted_token_windows(tokenizer, text: str) -> list[tuple[list[int], list[float]]]:
    """A prompt as 77-token windows ``(ids, weights)``: ``[BOS] <= 75 tokens [EOS] [PAD]...``.

    Each weighted run of :func:`parse_prompt_attention` is tokenized on its own (no special
    tokens); the tokens are cut into windows of ``model_max_length - 2`` (75). BOS, EOS and padding
    (``tokenizer.pad_token_id``) have weight 1. An empty prompt gives one window.
    """
    size = tokenizer.model_max_length
    body = size - 2
    ids: list[int] = []
    weights: list[float] = []
    for run_text, weight in parse_prompt_attention(text):
        with TOKENIZER_LOCK:
            run_ids = tokenizer(run_text, add_special_tokens=False, truncation=False, verbose=False).input_ids
        ids += run_ids
        weights += [weight] * len(run_ids)
    windows = []
    for start in range(0, max(len(ids), 1), body):
        chunk_ids, chunk_weights = ids[start:start + body], weights[start:start + body]
        pad = size - 2 - len(chunk_ids)
        windows.append((
            [tokenizer.bos_token_id, *chunk_ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad,
            [1.0, *chunk_weights, 1.0] + [1.0] * pad,
        ))
    return windows


def empty_window(tokenizer) -> tuple[list[int], list[float]]:
    """The window of an empty prompt, used to pad prompts to the same number of windows."""
    return weighted_token_windows(tokenizer, "")[0]


def encode_weighted_text(text_encoder, tokenizer, texts: Sequence[str], clip_skip: int | None = None,
                         num_windows: int | None = None, penultimate: bool = False) -> torch.Tensor:
    """Encode A1111-weighted prompts of any length: (batch, 77 * windows, dim).

    The rule, per prompt and per 77-token window (see :func:`weighted_token_windows`):
    ``e`` = the text encoder's hidden states for the window (with ``clip_skip`` as in
    :func:`run_text_encoder`, ``penultimate`` too), ``w`` = the per-token weights;
    ``e_w = e * w[:, None]``, then ``e_w * (mean(e) / mean(e_w))`` where each mean is taken over all
    tokens and channels of that window (the factor is 1 where a mean is ~0, see
    :func:`mean_restoring_factor`). The windows' results are concatenated along the tokens.
    Prompts with fewer windows than the longest (or than ``num_windows``) get empty-prompt windows
    appended. With all weights 1 and at most 75 tokens, this equals the default encoding.
    """
    per_text = [weighted_token_windows(tokenizer, t) for t in texts]
    count = max(len(w) for w in per_text)
    if num_windows is not None:
        if count > num_windows:
            raise ValueError(f"a prompt needs {count} windows of {tokenizer.model_max_length} tokens, "
                             f"more than the {num_windows} of the embeddings it is paired with")
        count = num_windows
    pad = empty_window(tokenizer)
    windows = [window for w in per_text for window in w + [pad] * (count - len(w))]
    device = text_encoder.device
    ids = torch.tensor([ids for ids, _ in windows], device=device)
    weights = torch.tensor([weights for _, weights in windows], device=device)
    embeds = run_text_encoder(text_encoder, ids, clip_skip=clip_skip, penultimate=penultimate)  # one batch
    weighted = embeds * weights[:, :, None].to(embeds.dtype)
    rescaled = weighted * mean_restoring_factor(embeds, weighted).to(embeds.dtype)
    return rescaled.reshape(len(per_text), count * rescaled.shape[1], rescaled.shape[2])


#: A window's mean counts as ~0 below this share of its mean absolute value (the ratio of means
#: would then be noise: e.g. layer-normed hidden states without a bias have a mean of exactly 0).
MEAN_TOLERANCE = 1e-3


def mean_restoring_factor(embeds: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
    """Per window, ``mean(embeds) / mean(weighted)`` (in float32), as A1111 rescales weighted
    embeddings; 1 where either mean is ~0 (see :data:`MEAN_TOLERANCE`) or the ratio is not finite."""
    embeds, weighted = embeds.float(), weighted.float()
    old_mean = embeds.mean(dim=(1, 2), keepdim=True)
    new_mean = weighted.mean(dim=(1, 2), keepdim=True)
    significant = (old_mean.abs() > MEAN_TOLERANCE * embeds.abs().mean(dim=(1, 2), keepdim=True)) & \
        (new_mean.abs() > MEAN_TOLERANCE * weighted.abs().mean(dim=(1, 2), keepdim=True))
    factor = old_mean / torch.where(significant, new_mean, torch.ones_like(new_mean))
    return torch.where(significant & torch.isfinite(factor), factor, torch.ones_like(factor))


def _encode_weighted_pair(text_encoder, tokenizer, texts, uncond_texts, prompt_embeds, negative_prompt_embeds,
                          clip_skip):
    """Weighted prompt and negative prompt, padded to the same number of windows."""
    size = tokenizer.model_max_length
    if prompt_embeds is None and uncond_texts is not None:
        windows = max(len(weighted_token_windows(tokenizer, t)) for t in [*texts, *uncond_texts])
        prompt_embeds = encode_weighted_text(text_encoder, tokenizer, texts, clip_skip, windows)
    elif prompt_embeds is None:
        prompt_embeds = encode_weighted_text(text_encoder, tokenizer, texts, clip_skip)
    if uncond_texts is not None:
        if prompt_embeds.shape[1] % size:
            raise ValueError(f"prompt_embeds have {prompt_embeds.shape[1]} tokens, not a multiple of {size}; "
                             "pass negative_prompt_embeds too")
        negative_prompt_embeds = encode_weighted_text(text_encoder, tokenizer, uncond_texts, clip_skip,
                                                      prompt_embeds.shape[1] // size)
    return prompt_embeds, negative_prompt_embeds
