"""Writing a tiny GGUF for the tests, from the shipped tiny Llama, the way llama.cpp's converter does:
llama.cpp's tensor names (gguf.get_tensor_name_map), q/k rows permuted into its rotary layout, the
hyperparameters transformers reads back (integrations/ggml.py GGUF_CONFIG_MAPPING) and the sentencepiece
vocabulary as tokenizer metadata (gguf.SentencePieceVocab + SpecialVocab). F32 or F16 tensors, so the
model transformers loads from it must give exactly the source model's logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from msplora_dist.train.config import ASSETS

gguf = pytest.importorskip("gguf", reason="the GGUF tests need the [gguf] extra (in [dev]): pip install gguf")
pytest.importorskip("accelerate", reason="the GGUF tests need the [gguf] extra (in [dev]): pip install accelerate")

TINY = ASSETS / "tiny_llama"


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute of q/k rows; transformers' loader undoes it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def source_model(model_dir: Path = TINY):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def write_tiny_gguf(path: Path, model_dir: Path = TINY, *, tensor_dtype=np.float32, architecture: str = "llama",
                    tokenizer: bool = True) -> Path:
    """A GGUF of `model_dir` (a Llama with a sentencepiece tokenizer) at `path`."""
    model = source_model(model_dir)
    c = model.config
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if tensor_dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16)
    if tokenizer:
        vocab = gguf.SentencePieceVocab(model_dir)
        tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        data = tensor.numpy()
        if base.endswith("q_proj"):
            data = _permute(data, c.num_attention_heads, c.num_attention_heads)
        elif base.endswith("k_proj"):
            data = _permute(data, c.num_attention_heads, c.num_key_value_heads)
        # Norm weights stay F32, as llama.cpp keeps every 1-D tensor.
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data.astype(tensor_dtype if data.ndim > 1 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
