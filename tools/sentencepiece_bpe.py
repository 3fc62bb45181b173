"""One SentencePiece BPE trainer and its conversion to a transformers LlamaTokenizer, for the shipped default
tokenizer (tools/make_default_assets.py) and the quality study's (experiments/quality/prepare.py).

Both train the same kind of model: BPE with byte fallback and no normalisation (decode(encode(x)) == x),
digits split, unk/bos/eos/pad at 0/1/2/3 like the LLaMA models plus a pad piece of its own, trained without
the dummy prefix on lines that carry it by hand where it appears at run time, then shipped with the dummy
prefix on (encoding like the LLaMA tokenizers). What differs between the callers (vocabulary, whether the
vocabulary size is a hard limit, the longest line) is a parameter; the defaults are SentencePiece's own.
"""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model_pb2
from tokenizers.models import BPE
from transformers import LlamaTokenizer
from transformers.convert_slow_tokenizer import SentencePieceExtractor

# Special-token layout follows the original LLaMA SentencePiece models (unk/bos/eos
# at 0/1/2) plus a dedicated pad piece, so padding never aliases a real token.
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"

# Plain-text role markers (no extra special tokens needed). The {% generation %}
# block lets ``apply_chat_template(..., return_assistant_tokens_mask=True)`` mark
# assistant tokens for loss masking; the assistant turn ends with eos so a
# fine-tuned model learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ 'System: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def train_sentencepiece(lines: list[str], vocab_size: int, seed: int, *, hard_vocab_limit: bool | None = None,
                        max_sentence_length: int | None = None, input_sentence_size: int | None = None) -> bytes:
    """The serialized SentencePiece BPE model trained on `lines`, bit for bit reproducible: one thread (the
    result depends on the thread count), input in the given order, seeded.

    hard_vocab_limit=False lets a small corpus end below vocab_size instead of failing; max_sentence_length
    is the longest line (in bytes) trained on, longer ones are skipped; input_sentence_size caps the lines
    read (0: all). None leaves SentencePiece's default (True, 4192, 0) unset: the model records every option
    that was set in its trainer_spec, so passing a default explicitly would change the model's bytes (the
    shipped msplora_dist/assets/tiny_llama/tokenizer.model was trained without these three)."""
    optional = {"hard_vocab_limit": hard_vocab_limit, "max_sentence_length": max_sentence_length,
                "input_sentence_size": input_sentence_size}
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,  # any UTF-8 text tokenizes, no <unk> in practice
        split_digits=True,  # one token per digit: arithmetic/sorting rows stay learnable
        # LLaMA-style normalisation: none, so decode(encode(x)) == x exactly.
        normalization_rule_name="identity",
        add_dummy_prefix=False,  # the callers put the prefix space into their lines where it appears at run time
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        pad_piece=PAD,
        num_threads=1,  # single thread keeps training bit-for-bit reproducible
        shuffle_input_sentence=False,
        minloglevel=2,
        **{k: v for k, v in optional.items() if v is not None},
    )
    # Encoding-time behaviour must match the LLaMA tokenizer (prefix at the start
    # of a text), so switch the dummy prefix back on in the shipped model. The
    # vocabulary and merges are unaffected by this flag.
    proto = sp_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    proto.normalizer_spec.add_dummy_prefix = True
    return proto.SerializeToString()


def build_tokenizer(spm_path: Path) -> LlamaTokenizer:
    """Turn the SentencePiece BPE model into a transformers ``LlamaTokenizer``.

    transformers 5's ``LlamaTokenizer`` is a tokenizers BPE model with byte
    fallback and a Metaspace pre-tokenizer, i.e. exactly what SentencePiece BPE
    does; we feed it the SentencePiece vocab and merges directly (the merge
    ranks follow the piece order). Going through ``from_pretrained`` on the bare
    .model would also work but leaks load-time kwargs into tokenizer_config.json.
    save_pretrained writes tokenizer.json, so later loads never need sentencepiece.
    """
    extracted = SentencePieceExtractor(str(spm_path)).extract(BPE)
    tok = LlamaTokenizer(
        vocab=extracted["vocab"],
        merges=extracted["merges"],
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        add_prefix_space=True,
        model_max_length=256,
        padding_side="right",  # training pads right; flip for batched generation
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def check_tokenizer(tok, sp: spm.SentencePieceProcessor, samples: list[str]) -> None:
    """The transformers tokenizer encodes every sample like SentencePiece, decodes it back, and adds one bos."""
    for s in samples:
        ids_hf = tok.encode(s, add_special_tokens=False)
        ids_sp = sp.encode(s)
        if ids_hf != ids_sp:
            raise AssertionError(f"HF/SentencePiece mismatch on {s!r}: {ids_hf} vs {ids_sp}")
        if tok.decode(ids_hf) != s:
            raise AssertionError(f"round trip failed on {s!r}: {tok.decode(ids_hf)!r}")
        with_bos = tok.encode(s)
        if with_bos[0] != tok.bos_token_id or with_bos[1:] != ids_hf:
            raise AssertionError(f"bos handling unexpected on {s!r}: {with_bos}")
