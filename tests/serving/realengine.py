"""The real engine for serving tests and `python -m benchmarks serving`: llama.cpp's OpenAI server
(llama-cpp-python) on CPU, loading the tiny GGUF of tests/serving/tinyllama.py.

`tiny_model(dir)` writes the model once per directory; `start_engine(model, port)` runs
`python -m llama_cpp.server` as a real process on 127.0.0.1 and `wait_engine` waits until its
/v1/models answers. Tests skip (with the reason) where llama-cpp-python is not installed; `pip
install -e '.[test]'` (the Makefile) builds it.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import Proc, _base_env
from tests.serving.tinyllama import write_tiny_llama

MODEL = "tiny"  # the name clients ask for (`--model_alias`)


def missing() -> str:
    """Why the real engine cannot run here ("" when it can)."""
    for mod, pkg in (("llama_cpp", "llama-cpp-python[server]"), ("gguf", "gguf"),
                     ("sentencepiece", "sentencepiece"), ("openai", "openai"),
                     ("sse_starlette", "llama-cpp-python[server]")):
        if importlib.util.find_spec(mod) is None:
            return f"{pkg} is not installed (pip install -e '.[test]')"
    return ""


def tiny_model(directory: Path) -> Path:
    """The tiny GGUF in `directory` (written on first use, readable by every user)."""
    path = directory / "tiny.gguf"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".tiny-{time.monotonic_ns()}.gguf"
        write_tiny_llama(tmp)
        tmp.chmod(0o644)
        tmp.rename(path)
    return path


def engine_argv(model: Path, port: int, *, embedding: bool = False,
                python: str = sys.executable) -> list[str]:
    """The command the `llama_cpp` engine template runs, for a direct process."""
    return [python, "-u", "-m", "llama_cpp.server", "--model", str(model),
            "--model_alias", MODEL, "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", "2048", "--embedding", "true" if embedding else "false",
            "--interrupt_requests", "false", "--verbose", "false"]


def start_engine(model: Path, port: int, log: Path, *, embedding: bool = False) -> Proc:
    return Proc(engine_argv(model, port, embedding=embedding), _base_env(), log).start()


def wait_engine(port: int, proc: Proc | None = None, timeout: float = 60.0) -> None:
    """Block until http://127.0.0.1:{port}/v1/models answers 200 (the engine loaded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if proc is not None and proc.popen is not None and proc.popen.poll() is not None:
            raise AssertionError(f"the engine exited: {proc.output()[-2000:]}")
        if time.monotonic() > deadline:
            out = proc.output()[-2000:] if proc else ""
            raise AssertionError(f"the engine on port {port} did not answer in {timeout}s {out}")
        time.sleep(0.1)
