"""TrackStar proponents for a Hugging Face Llama-family checkpoint (Llama 2/3, Mistral, Qwen2).

Run (docs/bring_your_own_model.md):

    trackstar attribute --config configs/hf_llama.py \
        --config.model.checkpoint_dir=checkpoints/llama-1b \
        --config.corpus.path=corpus.jsonl --config.queries.path=queries.jsonl

The fields are those of ``configs/hf_gpt2.py`` (each commented there); the values below are
sized for a ~1B-parameter model on one accelerator.
"""

import os

import ml_collections

from trackstar.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    c = load_config_file(os.path.join(os.path.dirname(__file__), "hf_gpt2.py"))
    c.run_dir = "runs/hf_llama"
    # float32: 1B params are ~4.5 GB with room for per-example gradients on a 40+ GB device;
    # "bfloat16" halves that for larger models, at some gradient precision.
    c.model.dtype = "float32"
    # 0 would be max_position_embeddings (up to 128k for Llama 3): rows are padded to max_len.
    c.model.max_len = 512
    c.model.bos_token_id = -1  # config.json's (Llama 2 / Mistral: 1 "<s>"; Llama 3: 128000).
    # "auto" gives byte-level BPE tokenizers (Llama 3, Qwen2) the target's leading space and
    # SentencePiece-style ones (Llama 2, Mistral: "▁" prepended by the tokenizer) none.
    c.queries.space_before_target = "auto"
    c.featurize.batch_size = 8  # Per-example gradients of a 1B model, 512 tokens each.
    c.featurize.v_estimate_batch = 16
    c.mesh.memory_vocab_size = 128256
    return c
