"""Shared fixtures: each model is loaded once per test session.

``tiny`` is a randomly initialised two-layer Llama with the default model's tokenizer,
for fast tests of engine logic; ``real`` is the default model, for every capability;
``qwen`` is the second, tool-capable model; ``mistral`` is a tiny random model of an
architecture the own forward lacks (transformers' fallback runs it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from headstart.bench.serverproc import free_port, wait_healthy
from headstart.engine.engine import Engine, EngineConfig
from headstart.model import HFBackend, load
from headstart.model.loader import local_folder, resolve


@pytest.fixture(scope="session")
def real() -> HFBackend:
    return load()


def require_qwen() -> str:
    """The second model's name. Skips the test when it is not installed, unless
    ``HEADSTART_REQUIRE_QWEN`` is set (CI sets it, so there it must run)."""
    from headstart.model.qwen_chunks import QWEN05

    try:
        QWEN05.chunk_paths()
    except FileNotFoundError as exc:
        if os.environ.get("HEADSTART_REQUIRE_QWEN"):
            raise
        pytest.skip(f"the second model is not installed: {exc}")
    return QWEN05.name


@pytest.fixture(scope="session")
def qwen() -> HFBackend:
    """The second, tool-capable model (the ``qwen`` extra)."""
    return load(require_qwen())


@pytest.fixture
def qwen15() -> Iterator[HFBackend]:
    """The third model (the opt-in ``qwen15`` extra, ~7 GB in float32), for the tests that
    need it only: loaded per test and freed after, so one large model is held at a time."""
    import gc

    from headstart.model.qwen_chunks import QWEN15

    try:
        QWEN15.chunk_paths()
    except FileNotFoundError as exc:
        pytest.skip(f"the third model is not installed: {exc}")
    backend = load(QWEN15.name)
    yield backend
    del backend
    gc.collect()


@pytest.fixture(scope="session")
def tiny() -> HFBackend:
    tokenizer = AutoTokenizer.from_pretrained(local_folder(resolve(None)))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    return HFBackend(model, tokenizer, "tiny-llama")


@pytest.fixture(scope="session")
def mistral() -> HFBackend:
    tokenizer = AutoTokenizer.from_pretrained(local_folder(resolve(None)))
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           bos_token_id=1, eos_token_id=2)
    model = MistralForCausalLM(config)
    model.generation_config.eos_token_id = 2
    return HFBackend(model, tokenizer, "tiny-mistral")


@pytest.fixture(scope="module")
def oa(srv: Any) -> Any:
    """The official ``openai`` client on the module's live server (its ``srv`` fixture)."""
    import openai

    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def make_engine() -> Iterator[Callable[..., Engine]]:
    """Build and start engines that are stopped after the test."""
    engines: list[Engine] = []

    def build(backend: HFBackend, **config: object) -> Engine:
        engine = Engine(backend, config=EngineConfig(**config)).start()  # type: ignore[arg-type]
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.stop()


class LiveServer:
    """A real uvicorn server on a loopback port, in a thread of the test process.

    ``sndbuf`` fixes the kernel send buffer of every connection it accepts (they inherit
    the listening socket's), so a client that stops reading pushes back after that much.
    """

    def __init__(self, app: object, sndbuf: int | None = None) -> None:
        import uvicorn

        listener = None
        if sndbuf is not None:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            listener.bind(("127.0.0.1", 0))
        self.port = listener.getsockname()[1] if listener else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sndbuf = listener.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) if listener else None
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        run = (lambda: self.server.run(sockets=[listener])) if listener else self.server.run
        self.thread = threading.Thread(target=run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_healthy(self.url, timeout=120)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL server: ``$HEADSTART_TEST_PG_DSN`` (CI starts one), else a throwaway
    cluster started here. Never skipped: without PostgreSQL the store tests fail."""
    dsn = os.environ.get("HEADSTART_TEST_PG_DSN")
    if dsn:
        yield dsn
        return
    from tests import pg_cluster

    root, dsn = pg_cluster.start()
    try:
        yield dsn
    finally:
        pg_cluster.stop(root)


@contextlib.contextmanager
def pg_database(server: str) -> Iterator[str]:
    """A fresh, empty database on ``server``, dropped afterwards."""
    import uuid

    import psycopg

    name = f"headstart_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    base, _, _ = server.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    with pg_database(pg_server) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    """Each store test runs on both backends."""
    if request.param == "sqlite":
        return str(tmp_path / "headstart.db")  # type: ignore[operator]
    return request.getfixturevalue("pg_url")
