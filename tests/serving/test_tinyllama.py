"""The tiny GGUF is a real model: llama.cpp's OpenAI server loads it and answers every route the
mesh serves, deterministically at temperature 0 (tests/serving/tinyllama.py).

These call the engine directly, no mesh: what the end-to-end tests (test_serving_e2e.py) then
expect through it."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.serving.realengine import MODEL, missing, start_engine, tiny_model, wait_engine
from tests.serving.tinyllama import N_EMBD, N_VOCAB, write_tiny_llama

pytestmark = pytest.mark.skipif(bool(missing()), reason=missing() or "")


def test_the_model_file_is_small_and_the_same_for_a_seed(tmp_path: Path) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf")
    b = write_tiny_llama(tmp_path / "b.gguf")
    assert 400_000 < a.stat().st_size < 800_000
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    # and as a command
    argv = [sys.executable, "-m", "tests.serving.tinyllama", str(tmp_path / "c.gguf")]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert (tmp_path / "c.gguf").read_bytes() == a.read_bytes(), out.stderr

    import gguf

    reader = gguf.GGUFReader(a)
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == N_VOCAB
    assert reader.fields["llama.embedding_length"].parts[-1][0] == N_EMBD


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("engine")
    port = free_port()
    proc = start_engine(tiny_model(tmp), port, tmp / "engine.log", embedding=True)
    try:
        wait_engine(port, proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.stop()


def test_llama_cpp_answers_every_route_and_repeats_itself(engine: str) -> None:
    import openai

    client = openai.OpenAI(base_url=engine, api_key="none", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list().data] == [MODEL]

    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi to the mesh"}],
           "max_tokens": 24, "temperature": 0, "seed": 7}
    one = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    two = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    assert one.choices[0].message.content == two.choices[0].message.content
    assert one.usage.completion_tokens > 0
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**ask, stream=True)  # type: ignore[call-overload]
        if c.choices
    )
    assert streamed == one.choices[0].message.content

    text = {"model": MODEL, "prompt": "The gpu mesh", "max_tokens": 16, "temperature": 0,
            "seed": 7}
    plain = client.completions.create(**text)  # type: ignore[call-overload]
    chunks = [c.choices[0].text for c in client.completions.create(**text, stream=True)]  # type: ignore[call-overload]
    assert len(chunks) > 1 and "".join(chunks) == plain.choices[0].text

    emb = client.embeddings.create(model=MODEL, input=["one sentence", "and another one"])
    assert [len(e.embedding) for e in emb.data] == [N_EMBD, N_EMBD]
    again = client.embeddings.create(model=MODEL, input=["one sentence", "and another one"])
    assert [e.embedding for e in again.data] == [e.embedding for e in emb.data]
    alone = client.embeddings.create(model=MODEL, input="one sentence")  # batched apart: to
    assert alone.data[0].embedding == pytest.approx(emb.data[0].embedding, abs=1e-5)  # float noise
