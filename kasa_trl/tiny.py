"""The embedded default: a word-level tokenizer, tiny Llama / GPT-2 models and the shipped datasets.

Everything here is built in code or read from ``kasa_trl/data``, so examples and tests run without the
Hugging Face hub. The default tiny Llama (about 100k parameters) learns most shipped facts in under a minute
of full fine-tuning on a 2-core CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import datasets
import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

_Model = TypeVar("_Model", bound=PreTrainedModel)

DATA_DIR: Path = Path(str(resources.files("kasa_trl").joinpath("data")))
"""Folder holding the shipped ``sft.jsonl`` and ``dpo.jsonl``."""

DATASET_KINDS: tuple[str, ...] = ("sft", "dpo")

# Special tokens come first, so their ids are fixed whatever the vocabulary: <pad>=0, <unk>=1, <s>=2, </s>=3.
PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))

# Words the chat template and arithmetic need even when absent from the texts a vocabulary is built from.
_BASE_WORDS: tuple[str, ...] = ("system", "user", "assistant", *"0123456789", *".,:;!?'\"+-*/=()")

# Each message renders as "role: content</s>". The assistant's content and its </s> sit inside
# {% generation %} so TRL's `assistant_only_loss=True` trains the answer and the stop token, nothing else.
CHAT_TEMPLATE: str = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- message['role'] + ': ' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + eos_token }}"
    "{%- endif %}"
    "{{- '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
)


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Lowercase()


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Digits one by one: ten tokens cover every number, which is what lets a tiny model learn the sums.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )


def split_words(text: str) -> list[str]:
    """Split ``text`` into the tokens the tiny tokenizer sees: lowercased words, punctuation, digits."""
    return [word for word, _ in _pre_tokenizer().pre_tokenize_str(_normalizer().normalize_str(text))]


def _iter_texts(row: dict[str, Any]) -> Iterator[str]:
    for value in row.values():
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):  # conversational: a list of {"role", "content"} messages
            for message in value:
                yield message["content"]


def dataset_texts() -> Iterator[str]:
    """Every string in the shipped datasets (prompts, answers, message contents)."""
    for kind in DATASET_KINDS:
        for row in _read_jsonl(DATA_DIR / f"{kind}.jsonl"):
            yield from _iter_texts(row)


def build_tokenizer(texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Build a deterministic word-level tokenizer with a chat template.

    Args:
        texts: texts whose words form the vocabulary. Defaults to the shipped datasets.

    Returns:
        A fast tokenizer whose ids are the four special tokens (``<pad>``, ``<unk>``, ``<s>``, ``</s>`` =
        0..3) followed by the sorted words. Lowercases, splits on whitespace, punctuation and single digits.
        Decoding joins tokens with spaces, so ``decode(encode(text))`` equals ``" ".join(split_words(text))``.
    """
    vocab_words = set(_BASE_WORDS)
    for text in dataset_texts() if texts is None else texts:
        vocab_words.update(split_words(text))
    vocab_words.difference_update(SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *sorted(vocab_words)])}

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tokenizer.normalizer = _normalizer()
    tokenizer.pre_tokenizer = _pre_tokenizer()
    # Registered as added tokens: matched before normalization, never split, and recognised by TRL as the
    # end-of-turn token it checks for in the assistant mask.
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
    )


def _special_token_ids() -> dict[str, int]:
    return {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def _seeded_init(model_cls: type[_Model], config: PretrainedConfig, seed: int) -> _Model:
    # fork_rng keeps the caller's global RNG state untouched; devices=[] avoids touching CUDA.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config)


def build_tiny_llama(
    vocab_size: int, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, **config_overrides: Any
) -> LlamaForCausalLM:
    """Build a randomly initialised, deterministic tiny ``LlamaForCausalLM`` (float32).

    Args:
        vocab_size: size of the embedding and output layers, usually ``len(build_tokenizer())``.
        hidden_size: model width.
        num_layers: number of decoder layers.
        seed: seed of the weight initialisation; the caller's RNG state is left unchanged.
        **config_overrides: any other ``LlamaConfig`` field.

    Defaults: intermediate 128, 4 attention heads, 2 key/value heads, 256 positions, untied embeddings,
    special token ids matching :func:`build_tokenizer`.
    """
    config = LlamaConfig(
        **{
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": 128,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,
            **_special_token_ids(),
            **config_overrides,
        }
    )
    return _seeded_init(LlamaForCausalLM, config, seed)


def build_tiny_gpt2(
    vocab_size: int, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, **config_overrides: Any
) -> GPT2LMHeadModel:
    """Build a randomly initialised, deterministic tiny ``GPT2LMHeadModel`` (float32).

    Its attention and MLP projections are transformers' ``Conv1D`` (weight stored as in x out), the layer
    type KaSA must handle besides ``nn.Linear``.

    Args:
        vocab_size: size of the embedding and output layers.
        hidden_size: model width (``n_embd``).
        num_layers: number of blocks (``n_layer``).
        seed: seed of the weight initialisation; the caller's RNG state is left unchanged.
        **config_overrides: any other ``GPT2Config`` field.

    Defaults: inner size 128, 4 heads, 256 positions, untied embeddings, special token ids matching
    :func:`build_tokenizer`.
    """
    config = GPT2Config(
        **{
            "vocab_size": vocab_size,
            "n_embd": hidden_size,
            "n_inner": 128,
            "n_layer": num_layers,
            "n_head": 4,
            "n_positions": 256,
            "tie_word_embeddings": False,
            **_special_token_ids(),
            **config_overrides,
        }
    )
    return _seeded_init(GPT2LMHeadModel, config, seed)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_tiny_dataset(kind: str) -> datasets.Dataset:
    """Load a shipped dataset.

    Args:
        kind: ``"sft"``: about 200 rows in TRL's conversational format (column ``messages``);
            ``"dpo"``: about 100 rows of plain-string preference pairs (``prompt``, ``chosen``, ``rejected``).
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"kind={kind!r} is not a shipped dataset; choose one of {list(DATASET_KINDS)}")
    return datasets.Dataset.from_list(_read_jsonl(DATA_DIR / f"{kind}.jsonl"))
