"""A character-level tokenizer for the tiny random models (vocab 128), so calibration and eval run on text."""

from __future__ import annotations

from pathlib import Path


def add_char_tokenizer(folder: Path, vocab_size: int = 128, copy_to: Path | None = None) -> Path:
    """Write tokenizer files into `folder` (or into a copy at `copy_to`, leaving shared fixtures untouched).

    Printable ASCII characters map to ids, anything else to <unk>.
    """
    if copy_to is not None:
        import shutil

        shutil.copytree(folder, copy_to)
        folder = copy_to
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars[: vocab_size - 1])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(folder))
    return folder
