"""How a prompt becomes token ids: one rule for the server's text path and the learner.

It needs only the tokenizer's own methods (duck-typed), so `shared` keeps to pydantic and the
stdlib.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import JsonValue

from shared.schemas import Prompt, continues_final_message


def prompt_token_ids(tokenizer, prompt: Prompt, *, chat_template_kwargs: Mapping[str, JsonValue]) -> list[int]:
    """A prompt's token ids, for the server's text path and the learner alike.

    A text gets the tokenizer's BOS token exactly when its encoder adds one (Llama, Mistral and
    Gemma do; Qwen does not) and no end-of-sequence token. A conversation is rendered by the chat
    template, given `chat_template_kwargs`, then tokenized without special tokens: templates write
    their own BOS. As TRL renders a prompt: after a user or tool message with the generation prompt
    (the assistant's turn opened); after an assistant message with that message left open, for the
    completion to continue (a prefill); any other last role is a ValueError.
    """
    if isinstance(prompt, list):
        messages = [m.model_dump() for m in prompt]
        prefill = continues_final_message(prompt)
        text = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=not prefill,
            continue_final_message=prefill,
            tokenize=False,
            **chat_template_kwargs,
        )
        return list(tokenizer.encode(text, add_special_tokens=False))
    ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]
    return [bos, *ids] if adds_bos else ids
