"""The built-in byte tokenizer of the vocabulary-256 presets, and `load_tokenizer_for` a model.

A token id is a UTF-8 byte value, so every text encodes and nothing is downloaded. The special
tokens are control bytes that text does not use, with the ids of the `tiny` preset's config (the
Llama convention): pad = 0 (NUL), bos = 1 (SOH), eos = 2 (STX). A text that does contain those
bytes reads them as the special tokens.
"""

from __future__ import annotations

import os

from moai_jax.errors import DataError


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255; the slice of the Hugging Face tokenizer API that moai_jax uses."""

    vocab_size = 256
    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    chat_template = None

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The bytes of `text`, after bos when `add_special_tokens`."""
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, list]:
        """As a Hugging Face tokenizer: {"input_ids": ids} for a text, or a list of ids per text."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in text]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        special = {self.pad_token_id, self.bos_token_id, self.eos_token_id}
        kept = [int(i) for i in ids if not (skip_special_tokens and int(i) in special)]
        return bytes(kept).decode("utf-8", errors="replace")

    def save_pretrained(self, path: str) -> None:
        """Write a Hugging Face tokenizer folder that gives the same ids (`AutoTokenizer` reads it)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        special = {self.pad_token_id: "<pad>", self.bos_token_id: "<s>", self.eos_token_id: "</s>"}
        vocab = {special.get(byte, char): byte for byte, char in bytes_to_unicode().items()}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", self.bos_token_id)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
        fast.save_pretrained(path)


def load_tokenizer_for(model_name_or_path: str):
    """The tokenizer of a model: a Hugging Face model folder's own, or the byte tokenizer for a preset name."""
    if os.path.isdir(model_name_or_path):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(model_name_or_path)
        except (OSError, ValueError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"cannot load a tokenizer from {model_name_or_path}: {first_line}") from None
    if os.sep in model_name_or_path or "/" in model_name_or_path:
        raise DataError(f"no model folder at {model_name_or_path}; name a folder with a tokenizer or a preset")
    return ByteTokenizer()
