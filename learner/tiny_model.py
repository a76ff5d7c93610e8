"""Build the bundled tiny model: a seeded Qwen2 with a locally trained tokenizer, no hub needed.

`grpo-tiny-model OUT_DIR [--family qwen2] [--seed 0] [--warmup addition] [--warmup-steps N] [--force]`
writes a Hugging Face directory that both transformers and vLLM load: config.json,
model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json, and
tiny_model.json (the manifest: the family, the build arguments and, after a warm-up, the held-out
figures).

Families: the default is qwen2, the bundled model; the others are seeded random models of other
architectures, all hidden 128, 2 layers, 2 query heads of head_dim 64 (vLLM's CPU attention
refuses head_dim 16), float32, tied or not as the family's real checkpoints are. Each exercises
something the learner must reproduce exactly to match vLLM's logprobs:

| family  | BOS | EOS ids | tied | also exercises                                                |
|---------|-----|---------|------|---------------------------------------------------------------|
| qwen2   | no  | 1       | no   | the bundled model                                             |
| qwen3   | no  | 1       | yes  | q/k RMSNorm; head_dim set apart from hidden / heads           |
| llama   | yes | 2       | no   | eos_token_id [<|endoftext|>, <|eot_id|>], as Llama-3-Instruct |
| mistral | yes | 1       | no   | GQA (1 KV head); max_position_embeddings 256                  |
| gemma2  | yes | 1       | yes  | final softcap 5; attention softcap 50 (1)                     |
| gemma3  | yes | 1       | yes  | final softcap 5; sliding window 8 on layer 0; q/k norm        |
| granite | no  | 1       | yes  | logits_scaling 8; embedding, residual, attention multipliers  |
| cohere  | yes | 1       | yes  | logit_scale 0.5; parallel attention and MLP; LayerNorm        |

(1) transformers' sdpa attention drops attn_logit_softcapping; its eager attention applies it, as
vLLM does.

Their weights are drawn with a wider init (INIT_STD) than Hugging Face's 0.02: logits get a std of
about 1 instead of 0.2, so softcapping at 5 and logit scaling change the log-probabilities by
tenths of a nat or more, where with 0.02 a missing cap of 5 would hide below 1e-3. The qwen2
default keeps 0.02, with which its warm-up (DEFAULT_WARMUP_STEPS) was measured; only qwen2 has
the addition warm-up.

The addition task: the prompt is "a+b=" with 0 <= a, b < ADDITION_OPERAND_LIMIT, the answer is
str(a + b) followed by eos. The train/held-out split is fixed for the task and independent of
any seed: the unordered pairs {a, b} are shuffled with ADDITION_SPLIT_SEED and the first
ADDITION_HELDOUT_FRACTION of them are held out, both orders of each (so "7+12=" is never trained
on when "12+7=" is held out). The model seed only changes the initial weights and the warm-up's
batch order.

Same seed and arguments give a byte-identical model.safetensors and tokenizer.json. After a
warm-up this also held between 1 and 2 CPU threads with torch 2.13; another torch build or CPU
may round differently.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CohereConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GenerationConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
)

from shared.errors import ConfigError

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

VOCAB_SIZE = 1024
"""BPE target size; the trainer stops earlier if the corpus runs out of merges."""
CORPUS_SEED = 1234
"""The tokenizer corpus is fixed, so every model seed shares one tokenizer."""
ADDITION_OPERAND_LIMIT = 50
"""Operands are drawn from range(ADDITION_OPERAND_LIMIT)."""
ADDITION_SPLIT_SEED = 20241125
"""Fixes the train/held-out split once for every model seed."""
ADDITION_HELDOUT_FRACTION = 0.2
"""Share of unordered pairs held out."""
WARMUP_TASKS = ("addition",)
DEFAULT_WARMUP_STEPS = 800
"""Measured on 2 cores: 400 steps (~10 s) give 11-47% held-out exact match over seeds 0-5 (26%
for seed 0), leaving GRPO room to improve; 600 steps already give 64-92%."""
WARMUP_BATCH_SIZE = 64
WARMUP_LEARNING_RATE = 1e-3
WARMUP_REVERSED_FRACTION = 0.5
"""Share of warm-up rows whose sum is written reversed (see `warmup_addition`)."""
"""At 3e-3 with no ramp, seed 0 stalled on a plateau (4% exact match after 1600 steps)."""
WARMUP_LR_RAMP_FRACTION = 0.1
MANIFEST = "tiny_model.json"
MANIFEST_FORMAT = 4
"""3: generation_config.json carries the task's stop string (after a warm-up); 4: the family."""
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

# Corpus vocabulary: a small grammar's worth of common words, so sentences look like English
# and the unsupervised examples can be written in words the tokenizer knows whole.
_DETERMINERS = ["the", "a", "one", "every", "that", "this", "my", "your", "our", "some", "no"]
_ADJECTIVES = (  # noqa: SIM905 - a word list reads better as prose than as quoted items
    "small large quiet loud old young bright dark warm cold green blue red yellow happy sad "
    "quick slow brave gentle tall short heavy light clever kind wild calm early late soft hard "
    "clean dirty empty full rich poor busy lazy proud shy strong weak sweet bitter fresh tired "
    "hungry lucky silver golden wooden narrow wide deep round sharp strange famous honest"
).split()
_NOUNS = (  # noqa: SIM905 - a word list reads better as prose than as quoted items
    "cat dog bird fish horse river mountain forest garden house window door table chair book "
    "letter child teacher farmer doctor king queen city village road bridge ship train boat "
    "apple bread water fire stone tree flower sun moon star cloud wind rain snow field market "
    "song story friend family morning evening night day winter summer baker sailor painter "
    "student mother father sister brother girl boy kitchen school church castle island lake "
    "ocean beach valley hill wall tower street corner shop library office letter basket box "
    "bottle cup plate spoon knife candle lamp clock picture map key coin ring hat coat shoe "
    "blanket pillow bed floor roof garden orange lemon cake cheese egg milk soup rice corn "
    "wheat grass leaf seed rose bee wolf fox bear rabbit mouse goat sheep cow duck owl"
).split()
_VERBS = (  # noqa: SIM905 - a word list reads better as prose than as quoted items
    "saw found made took gave kept left held met built painted carried opened closed watched "
    "followed helped liked loved wanted called visited crossed climbed pushed pulled cleaned "
    "counted wrote read sang played bought sold brought caught chose cooked covered dropped "
    "fixed filled guarded hid hugged lifted lost marked moved noticed ordered packed picked "
    "planted raised reached remembered saved shared showed sent signed taught threw touched "
    "washed warmed"
).split()
_INTRANSITIVE = (  # noqa: SIM905 - a word list reads better as prose than as quoted items
    "slept ran walked waited laughed smiled danced rested swam jumped arrived cried shouted "
    "whispered listened worked studied travelled stayed returned fell grew sat stood"
).split()
_PREPOSITIONS = (  # noqa: SIM905 - a word list reads better as prose than as quoted items
    "in on near under over behind beside across through into after before along around "
    "above below between toward without"
).split()
_ADVERBS = (  # noqa: SIM905 - a word list reads better as prose than as quoted items
    "slowly quickly quietly happily often always never again together softly carefully "
    "suddenly gladly loudly rarely early yesterday today"
).split()
_CONNECTIVES = ["and then", "but", "because", "so", "while", "after that", "until", "when"]


@dataclass(frozen=True)
class AdditionEval:
    """Greedy and teacher-forced figures of a model on addition rows."""

    exact_match: float
    """Fraction of rows whose greedy completion starts with exactly the answer, then '='."""
    mean_answer_prob: float
    """Mean over rows of the mean teacher-forced probability of the answer's digit tokens."""
    mean_end_prob: float
    """Mean teacher-forced probability of '=' (the attempt's end) right after the answer."""


ATTEMPT_END = "="
"""Ends the model's attempt in the warm-up format `a+b=` -> `c=c<eos>`."""


def addition_completion(answer: str) -> str:
    """What the warm-up teaches the model to write after `a+b=`: `c=c` (then eos).

    The attempt is everything before the first '='; the rest restates it. A rollout stopped at
    '=' (sampling stop string) is the attempt, and `prompt ++ attempt ++ answer` is then a
    sequence of the trained format, so the answer_perplexity reward p(answer | prompt, attempt)
    measures whether the attempt holds the answer: the premise of likelihood rewards (RLPR),
    where a completion that reaches the answer makes the reference answer likely.
    """
    return f"{answer}{ATTEMPT_END}{answer}"


Family = Literal["qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3", "granite", "cohere"]
FAMILIES: tuple[Family, ...] = ("qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3", "granite", "cohere")
DEFAULT_FAMILY: Family = "qwen2"
INIT_STD = 0.1
"""Weight init std of every family but qwen2 (see the module docstring): logits of std ~1."""


@dataclass(frozen=True)
class FamilyTokens:
    """Where a family's tokenizer differs from Qwen's; the BPE vocabulary itself is shared."""

    bos: str | None
    """Token prepended when encoding with special tokens (as Llama, Mistral, Gemma, Cohere do)."""
    extra_eos: tuple[str, ...] = ()
    """More special tokens that end generation: generation_config's eos_token_id lists them too."""


FAMILY_TOKENS: dict[Family, FamilyTokens] = {
    "qwen2": FamilyTokens(bos=None),
    "qwen3": FamilyTokens(bos=None),
    "llama": FamilyTokens(bos="<|begin_of_text|>", extra_eos=("<|eot_id|>",)),
    "mistral": FamilyTokens(bos="<s>"),
    "gemma2": FamilyTokens(bos="<bos>"),
    "gemma3": FamilyTokens(bos="<bos>"),
    # Granite's GPT-2-style tokenizer adds no BOS (add_bos_token false in its checkpoints).
    "granite": FamilyTokens(bos=None),
    "cohere": FamilyTokens(bos="<BOS_TOKEN>"),
}


# ---------------------------------------------------------------------------------------------
# The addition task


def addition_split() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Split every ordered pair (a, b) of the addition task into train and held-out.

    Returns:
        (train_pairs, heldout_pairs), each sorted, disjoint, covering all
        ADDITION_OPERAND_LIMIT**2 ordered pairs; a pair and its swap are always on the same side.
    """
    unordered = [(a, b) for a in range(ADDITION_OPERAND_LIMIT) for b in range(a, ADDITION_OPERAND_LIMIT)]
    random.Random(ADDITION_SPLIT_SEED).shuffle(unordered)
    n_heldout = round(len(unordered) * ADDITION_HELDOUT_FRACTION)
    heldout = {p for a, b in unordered[:n_heldout] for p in ((a, b), (b, a))}
    train = {p for a, b in unordered[n_heldout:] for p in ((a, b), (b, a))}
    return sorted(train), sorted(heldout)


def addition_rows(seed: int, count: int, *, split: Literal["train", "heldout"] = "train") -> list[dict[str, str]]:
    """Draw `count` distinct addition rows from one side of the fixed split, in a seeded order.

    Args:
        seed: Seed of the draw; the same seed gives the same rows in the same order.
        count: Number of rows; at most the size of the split.
        split: "train" (the warm-up's pairs) or "heldout" (never trained on).

    Returns:
        Rows {"prompt": "12+7=", "answer": "19"}.

    Raises:
        ValueError: Unknown split, or count larger than the split.
    """
    train, heldout = addition_split()
    pairs = {"train": train, "heldout": heldout}.get(split)
    if pairs is None:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 0 <= count <= len(pairs):
        raise ValueError(f"count must be in [0, {len(pairs)}] for split {split!r}, got {count}")
    chosen = random.Random(seed).sample(pairs, count)
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in chosen]


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _sentence(rng: random.Random) -> str:
    def noun_phrase() -> str:
        words = [rng.choice(_DETERMINERS)]
        if rng.random() < 0.6:
            words.append(rng.choice(_ADJECTIVES))
        noun = rng.choice(_NOUNS)
        # Plurals give the tokenizer more to merge; the grammar does not mind "a cats".
        words.append(noun + "s" if rng.random() < 0.25 else noun)
        return " ".join(words)

    def clause() -> str:
        if rng.random() < 0.3:
            parts = [noun_phrase(), rng.choice(_INTRANSITIVE)]
        else:
            parts = [noun_phrase(), rng.choice(_VERBS), noun_phrase()]
        if rng.random() < 0.4:
            parts += [rng.choice(_PREPOSITIONS), noun_phrase()]
        if rng.random() < 0.2:
            parts.append(rng.choice(_ADVERBS))
        return " ".join(parts)

    text = clause()
    if rng.random() < 0.3:
        text += " " + rng.choice(_CONNECTIVES) + " " + clause()
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?"])


def tokenizer_corpus() -> list[str]:
    """The fixed text the tokenizer is trained on: sentences, sums, and chat-formatted turns."""
    rng = random.Random(CORPUS_SEED)
    lines = [_sentence(rng) for _ in range(4000)]
    # Sums merge nothing (digits are split before BPE); they make the corpus cover the task's text.
    for _ in range(1000):
        a, b = rng.randrange(1000), rng.randrange(1000)
        lines.append(f"{a}+{b}={a + b}")
    # Chat turns without the special tokens: the BPE trainer does not cut text at added tokens,
    # so including them would merge pieces like "?<|"; this way "user" and "assistant" merge.
    for _ in range(200):
        lines.append(f"user\n{_sentence(rng)}\nassistant\n")
    return lines


def write_tokenizer(out_dir: Path, *, family: Family = DEFAULT_FAMILY) -> None:
    """Train the byte-level BPE tokenizer on `tokenizer_corpus` and write it to `out_dir`.

    Deterministic: the same tokenizer.json every time. Digits are split one per token before the
    byte-level step, so "12+7=" is ["1", "2", "+", "7", "="] and no number is ever merged into a
    multi-digit token. Every family shares the trained vocabulary; a family's BOS and extra EOS
    tokens (FAMILY_TOKENS) are appended after it, so the shared ids do not move.

    Args:
        out_dir: Existing directory; gets tokenizer.json and tokenizer_config.json.
        family: Whose special tokens: a BOS prepended when encoding with special tokens, and the
            extra end-of-generation tokens.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tokens = FAMILY_TOKENS[family]
    added = [t for t in (tokens.bos, *tokens.extra_eos) if t is not None]
    tok.add_special_tokens(added)
    if tokens.bos is not None:
        # What Llama-3's tokenizer.json does: the BOS comes from the post-processor, so
        # `encode(text)` adds it and `encode(text, add_special_tokens=False)` does not.
        bos = tokens.bos
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0",
                    pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, tok.token_to_id(bos))],
                ),
            ]
        )
    tok.save(str(out_dir / "tokenizer.json"))
    # Written by hand rather than by PreTrainedTokenizerFast.save_pretrained: transformers 5
    # would write tokenizer_class "TokenizersBackend", "extra_special_tokens" and a separate
    # chat_template.jinja, which transformers 4.x cannot read; this form loads in both.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **({"bos_token": tokens.bos} if tokens.bos is not None else {}),
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "additional_special_tokens": [IM_START, IM_END, *tokens.extra_eos],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Model


def _model_config(tokenizer: PreTrainedTokenizerBase, family: Family) -> PretrainedConfig:
    """The family's config at the tiny size; ids from the tokenizer, never the class defaults."""
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "dtype": "float32",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    wide = {"initializer_range": INIT_STD}
    match family:
        case "qwen2":
            return Qwen2Config(**common, tie_word_embeddings=False, use_sliding_window=False)
        case "qwen3":
            return Qwen3Config(**common, **wide, head_dim=64, tie_word_embeddings=True, use_sliding_window=False)
        case "llama":
            return LlamaConfig(**common, **wide, head_dim=64, tie_word_embeddings=False)
        case "mistral":
            return MistralConfig(
                **common | {"num_key_value_heads": 1, "max_position_embeddings": 256},
                **wide,
                head_dim=64,
                sliding_window=None,
                tie_word_embeddings=False,
            )
        case "gemma2":
            return Gemma2Config(
                **common,
                **wide,
                head_dim=64,
                query_pre_attn_scalar=64,
                final_logit_softcapping=5.0,
                attn_logit_softcapping=50.0,
                sliding_window=4096,
                tie_word_embeddings=True,
            )
        case "gemma3":
            # A window of 8 on layer 0 is shorter than every prompt + completion of the tests,
            # so the sliding-window mask matters; layer 1 attends to everything.
            return Gemma3TextConfig(
                **common,
                **wide,
                head_dim=64,
                query_pre_attn_scalar=64,
                final_logit_softcapping=5.0,
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention"],
                tie_word_embeddings=True,
            )
        case "granite":
            # granite-3.0-2b-instruct's multipliers (its head_dim is 64 too).
            return GraniteConfig(
                **common,
                **wide,
                embedding_multiplier=12.0,
                residual_multiplier=0.22,
                attention_multiplier=0.015625,
                logits_scaling=8.0,
                tie_word_embeddings=True,
            )
        case "cohere":
            # logit_scale 0.5 rather than Command-R's 0.0625, which would flatten every distribution.
            return CohereConfig(**common, **wide, logit_scale=0.5, use_qk_norm=False, tie_word_embeddings=True)
    raise ConfigError(f"family must be one of {FAMILIES}, got {family!r}")


def _encode_rows(
    tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, str]]
) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [tokenizer.encode(r["prompt"], add_special_tokens=False) for r in rows]
    answers = [tokenizer.encode(r["answer"], add_special_tokens=False) for r in rows]
    return prompts, answers


def _supervised_batch(
    prompts: list[list[int]], answers: list[list[int]], end_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids_B_T, attention_mask_B_T and labels_B_T (-100 outside answer+end)."""
    seqs = [p + a + [end_id] for p, a in zip(prompts, answers, strict=True)]
    width = max(len(s) for s in seqs)
    input_ids_B_T = torch.full((len(seqs), width), end_id, dtype=torch.long)
    attention_mask_B_T = torch.zeros((len(seqs), width), dtype=torch.long)
    labels_B_T = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        input_ids_B_T[i, : len(s)] = torch.tensor(s)
        attention_mask_B_T[i, : len(s)] = 1
        labels_B_T[i, len(p) : len(s)] = torch.tensor(s[len(p) :])
    return input_ids_B_T, attention_mask_B_T, labels_B_T


@torch.no_grad()
def evaluate_addition(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, str]]
) -> AdditionEval:
    """Greedy exact match and teacher-forced answer probabilities on addition rows.

    Args:
        model: Causal LM (put in eval mode by this function).
        tokenizer: Its tokenizer; prompts are encoded without special tokens.
        rows: Rows {"prompt", "answer"}.

    Returns:
        The figures, each averaged over rows.
    """
    model.eval()
    end_id = tokenizer.convert_tokens_to_ids(ATTEMPT_END)
    prompts, answers = _encode_rows(tokenizer, rows)

    # Teacher-forced: probability of each answer digit and of the '=' after it.
    input_ids_B_T, attention_mask_B_T, labels_B_T = _supervised_batch(prompts, answers, end_id)
    logits_B_T_V = model(input_ids=input_ids_B_T, attention_mask=attention_mask_B_T).logits
    # Position t predicts token t + 1, hence the shift.
    probs_B_T = torch.softmax(logits_B_T_V[:, :-1].float(), dim=-1)
    targets_B_T = labels_B_T[:, 1:]
    token_probs_B_T = probs_B_T.gather(-1, targets_B_T.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    answer_probs, end_probs = [], []
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        start = len(p) - 1  # shifted index of the first answer token
        answer_probs.append(token_probs_B_T[i, start : start + len(a)].mean().item())
        end_probs.append(token_probs_B_T[i, start + len(a)].item())

    # Greedy: rows grouped by prompt length, so each group decodes unpadded.
    max_new = max(len(a) for a in answers) + 1
    correct = 0
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for indices in by_length.values():
        ids_B_T = torch.tensor([prompts[i] for i in indices])
        for _ in range(max_new):
            next_B = model(input_ids=ids_B_T).logits[:, -1].argmax(-1)
            ids_B_T = torch.cat([ids_B_T, next_B[:, None]], dim=1)
        for row, i in enumerate(indices):
            generated = ids_B_T[row, len(prompts[i]) :].tolist()
            expected = answers[i] + [end_id]
            correct += generated[: len(expected)] == expected

    n = len(rows)
    return AdditionEval(
        exact_match=correct / n,
        mean_answer_prob=sum(answer_probs) / n,
        mean_end_prob=sum(end_probs) / n,
    )


def warmup_addition(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, *, seed: int, steps: int) -> None:
    """Supervised fine-tune in place on the train split, format `a+b=` -> `c=c<eos>`; the loss is
    on the completion and eos only.

    Each time a row is drawn, a fair coin (WARMUP_REVERSED_FRACTION) decides whether its sum is
    written with the digits reversed (`12+7=` -> `91=91`). The warmed model therefore emits
    answers but is undecided between two conventions for every prompt, as a pretrained model
    often is between formats; the reference answers of the supervised data favour one of them,
    a preference that GRPO can learn quickly and that carries over to held-out prompts. With
    shuffled answers the reward favours neither, which makes the control run meaningful.

    Args:
        model: Model to train (left in train mode).
        tokenizer: Its tokenizer.
        seed: Seed of the batch order.
        steps: AdamW steps of WARMUP_BATCH_SIZE rows each (cosine decay to zero).
    """
    train_pairs, _ = addition_split()
    rows = addition_rows(seed, len(train_pairs), split="train")
    prompts = [tokenizer.encode(r["prompt"], add_special_tokens=False) for r in rows]
    variants = [
        [
            tokenizer.encode(addition_completion(answer), add_special_tokens=False)
            for answer in (r["answer"], r["answer"][::-1])
        ]
        for r in rows
    ]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARMUP_LEARNING_RATE, betas=(0.9, 0.98), weight_decay=0.01)
    ramp = max(1, round(steps * WARMUP_LR_RAMP_FRACTION))

    def lr_factor(step: int) -> float:
        # Linear ramp, then cosine decay to zero; the ramp (with the lower rate) avoids the plateau.
        if step < ramp:
            return (step + 1) / ramp
        return 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(1, steps - ramp)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    bar = tqdm(range(steps), desc="warm-up addition", unit="step")
    for _ in bar:
        picked = torch.randint(len(rows), (WARMUP_BATCH_SIZE,), generator=generator).tolist()
        reversed_B = (torch.rand(WARMUP_BATCH_SIZE, generator=generator) < WARMUP_REVERSED_FRACTION).tolist()
        input_ids_B_T, attention_mask_B_T, labels_B_T = _supervised_batch(
            [prompts[i] for i in picked],
            [variants[i][rev] for i, rev in zip(picked, reversed_B, strict=True)],
            tokenizer.eos_token_id,
        )
        loss = model(input_ids=input_ids_B_T, attention_mask=attention_mask_B_T, labels=labels_B_T).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


# ---------------------------------------------------------------------------------------------
# Build


def _manifest_args(seed: int, warmup: str | None, warmup_steps: int) -> dict[str, object]:
    return {
        "format": MANIFEST_FORMAT,
        "seed": seed,
        "warmup": warmup,
        "warmup_steps": warmup_steps if warmup is not None else None,
    }


def is_built(
    out_dir: Path,
    *,
    family: Family = DEFAULT_FAMILY,
    seed: int = 0,
    warmup: str | None = None,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
) -> bool:
    """Whether `out_dir` holds a complete tiny model of `family` built with these arguments."""
    manifest = out_dir / MANIFEST
    if not manifest.is_file() or not all((out_dir / f).is_file() for f in MODEL_FILES):
        return False
    recorded = json.loads(manifest.read_text())
    return recorded["args"] == _manifest_args(seed, warmup, warmup_steps) and recorded["family"] == family


def build_tiny_model(
    out_dir: Path,
    *,
    family: Family = DEFAULT_FAMILY,
    seed: int = 0,
    warmup: str | None = None,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    force: bool = False,
) -> Path:
    """Build the tiny model into `out_dir`, or reuse it if it was built with the same arguments.

    The model is written to a temporary sibling directory and renamed into place, so a reader
    never sees a half-written model; the manifest tiny_model.json records the family and the
    arguments (and held-out figures after a warm-up).

    Args:
        out_dir: Target directory; created if missing.
        family: Architecture and tokenizer conventions (FAMILIES; see the module docstring).
        seed: Seed of the initial weights and of the warm-up's batch order.
        warmup: None, or "addition" for a short supervised fine-tune on the addition task
            (qwen2 only).
        warmup_steps: Warm-up optimizer steps (ignored without a warm-up).
        force: Rebuild even if a matching model is there, and replace a directory that does
            not hold a tiny model.

    Returns:
        `out_dir`.

    Raises:
        ConfigError: Unknown family or warm-up, a warm-up of another family than qwen2,
            non-positive steps, or `out_dir` holds something else.
    """
    if family not in FAMILIES:
        raise ConfigError(f"family must be one of {FAMILIES}, got {family!r}")
    if warmup is not None and warmup not in WARMUP_TASKS:
        raise ConfigError(f"warmup must be one of {WARMUP_TASKS} or None, got {warmup!r}")
    if warmup is not None and family != DEFAULT_FAMILY:
        raise ConfigError(f"the {warmup} warm-up is measured on {DEFAULT_FAMILY} only, not on {family}")
    if warmup is not None and warmup_steps <= 0:
        raise ConfigError(f"warmup_steps must be > 0, got {warmup_steps}")
    out_dir = Path(out_dir)
    args = _manifest_args(seed, warmup, warmup_steps)
    if not force and is_built(out_dir, family=family, seed=seed, warmup=warmup, warmup_steps=warmup_steps):
        return out_dir
    if not force and out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise ConfigError(f"{out_dir} exists and does not hold a tiny model; pass force to replace")

    started = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # mkdir rather than tempfile.mkdtemp, whose 0700 mode would survive the rename.
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    try:
        write_tokenizer(tmp_dir, family=family)
        # Warm up with the tokenizer as loaded from disk, i.e. exactly what vLLM will use.
        tokenizer = AutoTokenizer.from_pretrained(tmp_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(_model_config(tokenizer, family)).float()
        extra_eos_ids = tokenizer.convert_tokens_to_ids(list(FAMILY_TOKENS[family].extra_eos))
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            # A list, as Llama-3-Instruct's: vLLM stops on every id of it.
            eos_token_id=[tokenizer.eos_token_id, *extra_eos_ids] if extra_eos_ids else tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            # The sampling settings the task needs travel with the model: a rollout is the attempt
            # (see addition_completion), and the learner reads this when its config sets no `stop`.
            stop_strings=[ATTEMPT_END] if warmup == "addition" else None,
        )
        # The family sits beside "args" rather than in it, so a qwen2 manifest's args keep the
        # form they had before families existed; `is_built` checks both.
        manifest: dict[str, object] = {"family": family, "args": args}
        if warmup == "addition":
            warmup_addition(model, tokenizer, seed=seed, steps=warmup_steps)
            _, heldout_pairs = addition_split()
            heldout = addition_rows(0, len(heldout_pairs), split="heldout")
            manifest["heldout"] = asdict(evaluate_addition(model, tokenizer, heldout))
        manifest["seconds"] = round(time.monotonic() - started, 1)
        model.save_pretrained(tmp_dir)
        # The manifest goes last: with the model files, its presence marks the build complete.
        (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp_dir.rename(out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """Console script `grpo-tiny-model`."""
    parser = argparse.ArgumentParser(prog="grpo-tiny-model", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the model into")
    parser.add_argument("--family", choices=FAMILIES, default=DEFAULT_FAMILY, help="architecture (default qwen2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and warm-up")
    parser.add_argument("--warmup", choices=WARMUP_TASKS, default=None, help="supervised warm-up")
    parser.add_argument("--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS, help="warm-up optimizer steps")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    ns = parser.parse_args(argv)
    kwargs = {"family": ns.family, "seed": ns.seed, "warmup": ns.warmup, "warmup_steps": ns.warmup_steps}
    reused = not ns.force and is_built(ns.out_dir, **kwargs)
    out_dir = build_tiny_model(ns.out_dir, force=ns.force, **kwargs)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    config = json.loads((out_dir / "config.json").read_text())
    n_params = _count_params(out_dir / "model.safetensors")
    summary = (
        f"tiny {ns.family} model in {out_dir}: {n_params / 1e6:.2f}M params, vocab {config['vocab_size']}, "
        f"seed {ns.seed}, {'reused, ' if reused else ''}built in {manifest['seconds']} s"
    )
    if "heldout" in manifest:
        h = manifest["heldout"]
        summary += (
            f"; held-out addition exact match {h['exact_match']:.1%}, "
            f"answer prob {h['mean_answer_prob']:.3f}, end prob {h['mean_end_prob']:.3f}"
        )
    print(summary)


def _count_params(path: Path) -> int:
    with safe_open(path, "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - safe_open has no __iter__
