"""The learner's chunked logits equal each family's own `*ForCausalLM.forward`, post-processing
included (Granite's logits_scaling, Gemma-2/3's final soft-capping, Cohere's logit_scale)."""

from __future__ import annotations

import pytest
import torch
import transformers

from learner.logprobs import Sequence, scored_logprobs
from shared.errors import ConfigError

SIZES = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "max_position_embeddings": 64,
}

# family -> (config class, model class, settings that change the logits after the LM head)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 0.5}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"final_logit_softcapping": 0.5}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 4.0}),
}


def random_model(family: str) -> transformers.PreTrainedModel:
    config_name, model_name, post = FAMILIES[family]
    config = getattr(transformers, config_name)(**SIZES, **post)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).float().eval()
    with torch.no_grad():  # random init gives near-uniform logits; sharpen so post-processing shows
        model.get_output_embeddings().weight.mul_(20.0)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_equal_the_models_forward(family: str, temperature: float) -> None:
    model = random_model(family)
    prompt, completion = [3, 14, 15, 92, 65], [35, 89, 79, 32, 38]
    with torch.no_grad():
        ours_1_T = scored_logprobs(
            model, [Sequence.continuation(prompt, completion)], temperature=temperature, chunk_size=2, pad_id=0
        )
        logits_1_L_V = model(torch.tensor([prompt + completion])).logits.float() / temperature
    theirs_T = logits_1_L_V.log_softmax(-1)[0, len(prompt) - 1 : -1].gather(-1, torch.tensor(completion)[:, None])[:, 0]
    torch.testing.assert_close(ours_1_T[0], theirs_T)


def test_post_processing_matters_in_these_models() -> None:
    """Without its post-processing each model's log-probs move by far more than the tolerance above,
    so the test above would catch a learner that skipped it."""
    for family in ("granite", "gemma2", "gemma3_text", "cohere"):
        model = random_model(family)
        ids = torch.tensor([[3, 14, 15, 92, 65]])
        with torch.no_grad():
            full = model(ids).logits.log_softmax(-1)
            raw = model.get_output_embeddings()(model.get_decoder()(ids).last_hidden_state).log_softmax(-1)
        assert (full - raw).abs().max() > 0.1, family


def test_a_family_with_unknown_logit_processing_is_refused_by_name() -> None:
    config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(ConfigError, match=r"model type 'gpt2'.*supported: .*'granite'"):
        scored_logprobs(model, [Sequence.continuation([1, 2], [3])], temperature=1.0, chunk_size=4, pad_id=0)
