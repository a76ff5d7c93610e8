"""Log-probabilities of chosen tokens under the model: the only learner module that runs it.

Full-vocabulary logits are never formed for a whole batch: the decoder's hidden states are
gathered at the scored positions first, then the LM head runs over chunks of those rows. With
gradients on, each chunk is checkpointed, so backward recomputes its logits instead of keeping
every chunk's [chunk, vocab] activations alive at once.

The chunks compute what the family's `*ForCausalLM.forward` computes after its decoder (the LM
head, then Granite's division by `logits_scaling`, Gemma-2/3's final soft-capping, Cohere's
`logit_scale`), in float32 whatever the weights' dtype, so they match the logits vLLM samples
from. A family not in `LOGIT_POSTPROCESSING` is refused with the list of those that are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from shared.errors import ConfigError


def _plain(config) -> Callable[[Tensor], Tensor]:
    return lambda logits: logits


def _divide_by_logits_scaling(config) -> Callable[[Tensor], Tensor]:
    return lambda logits: logits / config.logits_scaling


def _multiply_by_logit_scale(config) -> Callable[[Tensor], Tensor]:
    return lambda logits: logits * config.logit_scale


def _final_softcapping(config) -> Callable[[Tensor], Tensor]:
    cap = config.final_logit_softcapping
    if cap is None:
        return _plain(config)
    return lambda logits: torch.tanh(logits / cap) * cap


LOGIT_POSTPROCESSING: dict[str, Callable] = {
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "phi3", "olmo2"], _plain
    ),
    **dict.fromkeys(["granite", "granitemoe", "granitemoeshared"], _divide_by_logits_scaling),
    **dict.fromkeys(["cohere", "cohere2"], _multiply_by_logit_scale),
    **dict.fromkeys(["gemma2", "gemma3_text"], _final_softcapping),
}
"""config.model_type -> what its *ForCausalLM.forward does to the LM head's output (read from
transformers 5.19's modeling files); tests/test_logprobs_scoring.py checks each family it builds
against model.forward."""


@dataclass(frozen=True)
class LogitHead:
    """The LM head and the family's logit post-processing, in float32."""

    weight_V_H: Tensor
    bias_V: Tensor | None
    postprocess: Callable[[Tensor], Tensor]

    @classmethod
    def of(cls, causal_lm: PreTrainedModel) -> LogitHead:
        """The head of `causal_lm`, or a ConfigError naming its family and the supported ones."""
        model_type = causal_lm.config.model_type
        if model_type not in LOGIT_POSTPROCESSING:
            raise ConfigError(
                f"model type {model_type!r}: the learner does not know what its forward does to the logits; "
                f"supported: {sorted(LOGIT_POSTPROCESSING)}"
            )
        head = causal_lm.get_output_embeddings()
        # float32 even for a bf16 head: bf16 logits round by up to ~0.06 nats per log-prob. The copy
        # is made once per call; the head is frozen, so no gradient flows to it.
        bias = None if head.bias is None else head.bias.float()
        return cls(head.weight.float(), bias, LOGIT_POSTPROCESSING[model_type](causal_lm.config))

    def logits(self, hidden_C_H: Tensor) -> Tensor:
        """[C, V] float32 logits, as the model's own forward computes them."""
        return self.postprocess(torch.nn.functional.linear(hidden_C_H.float(), self.weight_V_H, self.bias_V))


@dataclass(frozen=True)
class Sequence:
    """Tokens to run, and which next-token predictions to score.

    `targets[t]` is the token whose log-probability is read from the logits at position t (the
    logits that predict position t + 1); only positions with `scored[t]` count.
    """

    token_ids: list[int]
    targets: list[int]
    scored: list[bool]

    @classmethod
    def continuation(cls, prefix: list[int], continuation: list[int]) -> Sequence:
        """Score `continuation` given `prefix`: log p(continuation[j] | prefix ++ continuation[:j]).

        The logits at position t predict token t + 1, so the first continuation token is read at
        position len(prefix) - 1, and the last position of the sequence predicts nothing.
        """
        assert prefix, "a continuation needs a non-empty prefix to be predicted from"
        ids = prefix + continuation
        targets = ids[1:] + [0]
        scored = [False] * (len(prefix) - 1) + [True] * len(continuation) + [False]
        return cls(ids, targets, scored)

    @classmethod
    def aligned(cls, prefix: list[int], continuation: list[int], labels: list[int]) -> Sequence:
        """Run prefix ++ continuation; at continuation step t < min(len continuation, len labels),
        score `labels[t]` with the logits that predicted continuation token t."""
        assert prefix, "a continuation needs a non-empty prefix to be predicted from"
        ids = prefix + continuation
        covered = min(len(continuation), len(labels))
        start = len(prefix) - 1
        targets = [0] * len(ids)
        targets[start : start + covered] = labels[:covered]
        scored = [start <= t < start + covered for t in range(len(ids))]
        return cls(ids, targets, scored)


def scored_logprobs(
    model: PeftModel | PreTrainedModel,
    sequences: list[Sequence],
    *,
    temperature: float,
    chunk_size: int,
    pad_id: int,
) -> Tensor:
    """log softmax(logits / temperature) at the target of every scored position, shaped [N, T].

    Row i holds sequence i's scored positions in order, right-padded with zeros to the longest
    count T; differentiable if gradients are enabled.

    The pass's mode follows the grad mode: with gradients (the policy pass) the model is in train
    mode, so LoRA dropout applies and gradient checkpointing recomputes each layer (transformers
    checkpoints a layer only while training); without (rewards, reference, old logprobs) it is in
    eval mode, so the same input always gets the same scores.
    """
    grad = torch.is_grad_enabled()
    model.train(grad)
    device = next(model.parameters()).device
    length = max(len(s.token_ids) for s in sequences)
    input_ids_N_L = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_N_L = torch.zeros((len(sequences), length), dtype=torch.long)
    targets_N_L = torch.zeros((len(sequences), length), dtype=torch.long)
    scored_N_L = torch.zeros((len(sequences), length), dtype=torch.bool)
    for i, s in enumerate(sequences):
        n = len(s.token_ids)
        input_ids_N_L[i, :n] = torch.tensor(s.token_ids)
        attention_N_L[i, :n] = 1
        targets_N_L[i, :n] = torch.tensor(s.targets)
        scored_N_L[i, :n] = torch.tensor(s.scored)

    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    head = LogitHead.of(causal_lm)
    # use_cache=False: a scoring pass has no next step to cache keys and values for.
    hidden_N_L_H = causal_lm.get_decoder()(
        input_ids=input_ids_N_L.to(device), attention_mask=attention_N_L.to(device), use_cache=False
    ).last_hidden_state
    scored_dev_N_L = scored_N_L.to(device)
    hidden_M_H = hidden_N_L_H[scored_dev_N_L]
    targets_M = targets_N_L.to(device)[scored_dev_N_L]

    def chunk_logprobs(hidden_C_H: Tensor, targets_C: Tensor) -> Tensor:
        logits_C_V = head.logits(hidden_C_H) / temperature
        return logits_C_V.log_softmax(dim=-1).gather(-1, targets_C[:, None])[:, 0]

    pieces = []
    for start in range(0, hidden_M_H.shape[0], chunk_size):
        args = (hidden_M_H[start : start + chunk_size], targets_M[start : start + chunk_size])
        pieces.append(checkpoint(chunk_logprobs, *args, use_reentrant=False) if grad else chunk_logprobs(*args))
    # No scored position (every completion empty): the empty slice still goes through the head, so
    # the [N, 0] result hangs off the forward and backward gives every weight an exact-zero gradient.
    logprobs_M = torch.cat(pieces) if pieces else chunk_logprobs(hidden_M_H, targets_M)

    # Pack each row's scored values to the left: row i, slot j = its j-th scored position.
    slot_N_T = scored_mask(sequences).to(device)
    return torch.zeros(slot_N_T.shape, dtype=torch.float32, device=device).masked_scatter(slot_N_T, logprobs_M.float())


def scored_mask(sequences: list[Sequence]) -> Tensor:
    """[N, T] bool mask of the slots `scored_logprobs` fills."""
    counts_N = torch.tensor([sum(s.scored) for s in sequences])
    width = int(counts_N.max()) if len(sequences) else 0
    return torch.arange(width)[None, :] < counts_N[:, None]


def micro_batched_logprobs(
    model: PeftModel | PreTrainedModel,
    sequences: list[Sequence],
    *,
    temperature: float,
    chunk_size: int,
    pad_id: int,
    micro_batch_size: int,
) -> tuple[Tensor, Tensor]:
    """`scored_logprobs` over micro-batches, padded to one [N, T] tensor, with its mask (no grad)."""
    mask_N_T = scored_mask(sequences)
    out_N_T = torch.zeros(mask_N_T.shape, dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, len(sequences), micro_batch_size):
            part = scored_logprobs(
                model,
                sequences[start : start + micro_batch_size],
                temperature=temperature,
                chunk_size=chunk_size,
                pad_id=pad_id,
            )
            out_N_T[start : start + part.shape[0], : part.shape[1]] = part.cpu()
    return out_N_T, mask_N_T
