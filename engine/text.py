"""Text conditioning as the official SANA-Video pipeline does it: Gemma-2 hidden states of the prompt behind the
"complex human instruction" prefix, at most ``max_sequence_length`` tokens kept (the first token plus the last
max_len-1, as diffusers' ``select_index``), with the padding mask."""

from __future__ import annotations

import threading

import torch
from transformers import Gemma2Config, Gemma2Model, PreTrainedTokenizerFast

from engine.presets import COMPLEX_HUMAN_INSTRUCTION

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")


def build_word_tokenizer(vocab: tuple[str, ...] | list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (lowercase, split on whitespace and punctuation) with Gemma's special tokens;
    ``<bos>`` is prepended like Gemma's tokenizer does."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    words = list(SPECIAL_TOKENS) + [w for w in dict.fromkeys(vocab) if w not in SPECIAL_TOKENS]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    bos = words.index("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_text_encoder(config: dict, vocab_size: int, seed: int) -> Gemma2Model:
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2, **config)
    return Gemma2Model(cfg).eval()


def cut_padding(text: torch.Tensor, mask: torch.Tensor, multiple: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(text [B, L, C], mask [B, L]) without the trailing columns that every sample masks out, what is kept rounded
    up to a multiple of ``multiple`` (views; reads the mask on the host once).

    The transformer's cross-attention adds -1e4 to a padded key's score, so its softmax weight underflows to exactly
    0 as long as the row has one real key: without those keys the video is the same (to the summation order), and
    the cross-attention reads a prompt's tens of tokens instead of ``max_sequence_length`` (300). A sample without
    any real token attends evenly to its padding, so then nothing is cut.
    """
    if mask.ndim != 2 or mask.shape[1] <= multiple:
        return text, mask
    real = mask != 0
    position = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    last, every_row = torch.stack([(real * position).amax(), real.any(dim=1).all().long()]).tolist()
    keep = min(mask.shape[1], -(-last // multiple) * multiple)
    if not every_row or keep == mask.shape[1]:
        return text, mask
    return text[:, :keep], mask[:, :keep]


class TextEncoder:
    """Tokenizer + Gemma2 encoder; ``encode`` returns ([B, L, hidden], mask [B, L])."""

    def __init__(self, tokenizer, model: Gemma2Model, max_sequence_length: int, use_instruction: bool):
        self.tokenizer = tokenizer
        self.model = model
        self.max_sequence_length = max_sequence_length
        self.use_instruction = use_instruction
        self.tokenizer.padding_side = "right"
        self._instruction_tokens = None
        # A fast tokenizer keeps its padding and truncation settings in its shared Rust backend and sets them on
        # every call: a prompt check (no padding) in one thread could strip the padding from another's encode.
        self._tokenize_lock = threading.Lock()

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def to(self, device=None, dtype=None) -> "TextEncoder":
        self.model.to(device=device, dtype=dtype)
        return self

    def _texts(self, prompts: list[str], with_instruction: bool | None) -> tuple[list[str], int]:
        """The texts the tokenizer reads and the number of tokens it keeps of each (the rest is cut off)."""
        texts = [p.lower().strip() for p in prompts]
        use_chi = self.use_instruction if with_instruction is None else with_instruction
        total = self.max_sequence_length
        if use_chi:
            chi = "\n".join(COMPLEX_HUMAN_INSTRUCTION)
            texts = [chi + t for t in texts]
            if self._instruction_tokens is None:
                with self._tokenize_lock:
                    self._instruction_tokens = len(self.tokenizer.encode(chi))
            total = self._instruction_tokens + self.max_sequence_length - 2
        return texts, total

    def overflow(self, prompt: str, with_instruction: bool | None = None) -> tuple[int, int] | None:
        """(tokens, limit) when ``prompt`` is longer than the encoder reads (``encode`` would cut its end off), else
        None. Counted as ``encode`` counts: special tokens and the instruction prefix included."""
        (text,), total = self._texts([prompt], with_instruction)
        with self._tokenize_lock:
            n = len(self.tokenizer.encode(text))
        return (n, total) if n > total else None

    @torch.no_grad()
    def encode(self, prompts: list[str], with_instruction: bool | None = None):
        device = self.model.device
        max_len = self.max_sequence_length
        texts, total = self._texts(prompts, with_instruction)
        with self._tokenize_lock:
            enc = self.tokenizer(texts, padding="max_length", max_length=total, truncation=True,
                                 add_special_tokens=True, return_tensors="pt")
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        hidden = self.model(ids, attention_mask=mask)[0]
        select = [0] + list(range(-max_len + 1, 0))
        return hidden[:, select], mask[:, select]
