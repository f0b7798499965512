"""A tiny llama-architecture GGUF for tests and benchmarks: a real model file, nothing downloaded.

`write_tiny_llama(path)` trains a 512-piece SentencePiece vocabulary on generated text, draws
random weights from a fixed seed and writes a 2-layer, width-64 llama model (~0.6 MB, f32) with
`gguf`, in a fraction of a second. llama.cpp's OpenAI server (`python -m llama_cpp.server
--model PATH`) loads it and answers /v1/models, chat and text completions (streamed too) and,
with `--embedding`, embeddings with mean pooling (the file says `llama.pooling_type` = mean).
Its output is gibberish, but at temperature 0 with a seed the same request gets the same answer,
so tests can compare shapes, lengths, streamed with non-streamed, and two runs.

    python -m tests.serving.tinyllama OUT.gguf
"""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

N_VOCAB = 512
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
N_CTX = 2048
SEED = 27
EOG_IDS = (2, 4)  # </s> and <|im_end|>: where llama.cpp stops; bias them away for long answers
# <0x00>..<0xFF>: random bytes rarely make UTF-8, and llama-cpp-python holds a stream's text
# back (re-reading all of it each token, never checking for a gone client) until they do:
# bias them away too where a stream must flow token by token for long
BYTE_IDS = range(5, 261)

# A chat template (jinja, as GGUF files carry it) so chat completions format as ChatML.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["the", "and", "gpu", "mesh"]


def _corpus(rng: random.Random, lines: int = 1500) -> list[str]:
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    out = []
    for _ in range(lines):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        out.append(sentence.capitalize() + rng.choice(".!?,;:"))
    return out


def train_vocab(seed: int = SEED) -> bytes:
    """A serialized SentencePiece model with exactly N_VOCAB pieces (256 of them the bytes),
    the same for a seed."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(random.Random(seed))),
        model_writer=model,
        vocab_size=N_VOCAB,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,  # llama.cpp spells any character it lacks (newlines too) in bytes
        num_threads=1,
        minloglevel=2,
        unk_id=0, bos_id=1, eos_id=EOG_IDS[0], pad_id=-1,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],  # 3 and EOG_IDS[1]
    )
    return model.getvalue()


def write_tiny_llama(path: Path | str, seed: int = SEED) -> Path:
    """Write the model to `path` (overwritten) and return it."""
    import gguf
    import numpy as np
    import sentencepiece as spm

    path = Path(path)
    sp = spm.SentencePieceProcessor(model_proto=train_vocab(seed))
    assert sp.get_piece_size() == N_VOCAB, sp.get_piece_size()
    assert [sp.id_to_piece(i) for i in EOG_IDS] == ["</s>", "<|im_end|>"]
    assert [i for i in range(N_VOCAB) if sp.is_byte(i)] == list(BYTE_IDS)
    tokens, scores, types = [], [], []
    for i in range(N_VOCAB):
        tokens.append(sp.id_to_piece(i).encode())
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif tokens[-1].startswith(b"<|"):
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("gpumesh-tinyllama")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(N_VOCAB)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:  # numpy order: ggml's dimensions reversed
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    def norm() -> np.ndarray:
        return np.ones(N_EMBD, dtype=np.float32)

    w.add_tensor("token_embd.weight", weight(N_VOCAB, N_EMBD))
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", weight(N_EMBD, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weight(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weight(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weight(N_EMBD, N_FF))
    w.add_tensor("output_norm.weight", norm())
    w.add_tensor("output.weight", weight(N_VOCAB, N_EMBD))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m tests.serving.tinyllama OUT.gguf", file=sys.stderr)
        raise SystemExit(2)
    out = write_tiny_llama(sys.argv[1])
    print(f"{out} {out.stat().st_size} bytes")
