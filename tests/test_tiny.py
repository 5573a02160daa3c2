"""Tests for kasa_trl/tiny.py: the embedded tokenizer, tiny models and shipped datasets."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from kasa_trl.tiny import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    build_tiny_gpt2,
    build_tiny_llama,
    build_tokenizer,
    dataset_texts,
    load_tiny_dataset,
    split_words,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_special_token_ids(tokenizer) -> None:
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (PAD_ID, UNK_ID)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_ID, EOS_ID)


def test_tokenizer_is_deterministic(tokenizer) -> None:
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_tokenizer_round_trips_every_dataset_text_without_unk(tokenizer) -> None:
    texts = list(dataset_texts())
    assert len(texts) > 500
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert UNK_ID not in ids, text
        assert tokenizer.decode(ids) == " ".join(split_words(text))


def test_tokenizer_from_custom_texts_maps_unseen_words_to_unk() -> None:
    tokenizer = build_tokenizer(["Hello world!"])
    assert UNK_ID not in tokenizer("hello, WORLD 42")["input_ids"]
    assert tokenizer("goodbye")["input_ids"] == [UNK_ID]


def test_chat_template_renders_and_masks_the_assistant_answer_with_its_eos(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<s>system: Be brief.</s>\nuser: What is 2 + 3?</s>\nassistant: 2 + 3 = 5.</s>\n"
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("assistant: ")

    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    answer = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.convert_ids_to_tokens(answer) == ["2", "+", "3", "=", "5", ".", "</s>"]


def test_chat_template_satisfies_trl_assistant_only_loss(tokenizer) -> None:
    from trl.chat_template_utils import get_training_chat_template, is_chat_template_stop_token_trained

    assert get_training_chat_template(tokenizer) is None  # TRL needs no patched template
    assert is_chat_template_stop_token_trained(tokenizer)


def test_datasets_have_trl_columns() -> None:
    sft = load_tiny_dataset("sft")
    assert sft.column_names == ["messages"] and 150 <= len(sft) <= 250
    roles = {m["role"] for row in sft["messages"] for m in row}
    assert roles == {"system", "user", "assistant"}
    assert all(row[-1]["role"] == "assistant" for row in sft["messages"])

    dpo = load_tiny_dataset("dpo")
    assert dpo.column_names == ["prompt", "chosen", "rejected"] and 80 <= len(dpo) <= 120
    assert all(row["chosen"] != row["rejected"] for row in dpo)


def test_unknown_dataset_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        load_tiny_dataset("rlhf")


@pytest.mark.parametrize("build", [build_tiny_llama, build_tiny_gpt2])
def test_tiny_model_forward_with_labels(build, tokenizer) -> None:
    model = build(len(tokenizer))
    ids = torch.tensor([tokenizer("What is 2 + 3? 2 + 3 = 5.")["input_ids"]])  # (1, T)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("build", [build_tiny_llama, build_tiny_gpt2])
def test_tiny_model_init_is_seeded_and_leaves_global_rng_alone(build) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = build(50, seed=0), build(50, seed=0), build(50, seed=1)
    assert torch.equal(torch.rand(3), expected)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def test_tiny_llama_shape() -> None:
    model = build_tiny_llama(100, num_layers=3, hidden_size=32)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (3, 32, 128)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert not config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert build_tiny_llama(100, intermediate_size=48).config.intermediate_size == 48


def test_tiny_gpt2_uses_conv1d() -> None:
    model = build_tiny_gpt2(100)
    conv = [name for name, module in model.named_modules() if isinstance(module, Conv1D)]
    # c_attn, c_proj (attention), c_fc, c_proj (MLP) per block
    assert len(conv) == 4 * model.config.n_layer
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (64, 128)  # Conv1D stores (in, out)


@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_sft_trainer_smoke(tokenizer, tmp_path, assistant_only_loss: bool) -> None:
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        max_length=64,
        assistant_only_loss=assistant_only_loss,
        activation_checkpointing=True,  # TRL's default, under transformers 5's name (no deprecation warning)
    )
    trainer = SFTTrainer(
        model=build_tiny_llama(len(tokenizer)),
        args=args,
        train_dataset=load_tiny_dataset("sft"),
        processing_class=tokenizer,
    )
    labels = trainer.train_dataset[0]["labels"]  # TRL folds the assistant mask into the labels
    assert any(label != -100 for label in labels)
    assert (-100 in labels) == assistant_only_loss
    result = trainer.train()
    assert result.global_step == 2
    assert math.isfinite(result.training_loss)
