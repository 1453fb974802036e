"""A byte-level Hugging Face tokenizer: token id ``b`` is byte ``b`` (0..255), then a few special tokens.

Built with ``tokenizers`` (a BPE model with the 256 byte symbols of the GPT-2 byte-to-unicode map and no merges,
under a ``ByteLevel`` pre-tokenizer and decoder), wrapped in transformers' fast tokenizer, so that
``AutoTokenizer.from_pretrained(<model dir>)`` loads it offline and lm-eval's HF path can use it. Encoding then
decoding returns any UTF-8 string unchanged.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

BYTE_VOCAB = 256
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(BYTE_VOCAB, BYTE_VOCAB + len(SPECIAL_TOKENS))
VOCAB_SIZE = BYTE_VOCAB + len(SPECIAL_TOKENS)


def _byte_symbols() -> list[str]:
    """The unicode symbol ``ByteLevel`` maps each byte 0..255 to, in byte order."""
    table = _gpt2_byte_to_unicode()
    out = [table[b] for b in range(BYTE_VOCAB)]
    if set(out) != set(ByteLevel.alphabet()):
        raise RuntimeError("the tokenizers ByteLevel alphabet is not GPT-2's byte-to-unicode map")
    return out


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (the one ``ByteLevel`` uses)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cps = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            cps.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, cps)}


def byte_tokenizer_object() -> Tokenizer:
    """The raw ``tokenizers.Tokenizer``: ids 0..255 are bytes, then ``<pad> <s> </s> <unk>``."""
    vocab = {sym: i for i, sym in enumerate(_byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def byte_tokenizer(model_max_length: int = 512):  # -> transformers.PreTrainedTokenizerFast
    """A transformers fast tokenizer over :func:`byte_tokenizer_object` (no BOS/EOS added on encode)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer_object(), pad_token=PAD_TOKEN,
                                  bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN,
                                  model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    return tok


def encode_bytes(text: str) -> list[int]:
    """Token ids of ``text`` without a tokenizer object: its UTF-8 bytes."""
    return list(text.encode("utf-8"))
