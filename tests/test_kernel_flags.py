"""The runner's kernels chosen from the command line: ``--attention`` and ``--linear`` reach
the engine's runner, bad values are refused, and with ``tiled`` the engine's chunked prefill
is bitwise the prompt prefilled at once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from headstart.bench import runner as bench_runner
from headstart.cli.main import build_parser, main
from headstart.decode.sampling import SamplingParams
from headstart.engine.engine import Engine, EngineConfig, Request
from headstart.kv import KVSeq
from headstart.model import HFBackend
from headstart.model.attention import KERNELS
from headstart.model.llama import LINEARS
from headstart.model.runner import Feed, Runner, from_backend
from headstart.scaleout.app import flags
from headstart.server.flags import engine_config, server_config

LONG = ("Explain, step by step and with an example, how a hash table resolves collisions: chaining, open "
        "addressing, linear and quadratic probing, tombstones, and when and how to resize it. ") * 7


@pytest.mark.real
def test_with_tiled_attention_a_prompt_prefilled_in_chunks_is_bitwise_the_prompt_at_once(
    real: HFBackend, make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's step budget cuts a ~300-token prompt into chunks; its first token's
    logits, every decode's logits and every KV row the session holds are the same bits as
    a runner that prefilled the prompt in one forward and decoded the same tokens."""
    kv = real.info.kv_bytes_per_token
    engine = make_engine(real, attention="tiled", pre_position=False, gate=False, step_tokens=64, kv_budget=4096 * kv)
    assert isinstance(engine.runner, Runner) and engine.runner.kernel == "tiled"
    fed: list[tuple[list[int], torch.Tensor]] = []  # per forward of the engine: its one feed's ids and logits
    forward = engine.runner.forward

    def spy(feeds: list[Feed]) -> list[torch.Tensor]:
        out = forward(feeds)
        assert len(feeds) == 1  # nothing else runs beside the one request
        fed.append((list(feeds[0].ids), out[0].clone()))
        return out

    monkeypatch.setattr(engine.runner, "forward", spy)
    messages = [{"role": "user", "content": LONG}]
    c = engine.generate(Request(messages=messages, params=SamplingParams(max_tokens=6), session_id="chunked"))
    prompt = engine.template.render(messages)
    assert c.prompt_tokens == len(prompt) and len(prompt) > 250 and len(prompt) % 64 != 0 and len(c.token_ids) == 6
    sizes = [len(ids) for ids, _ in fed]
    chunks = next(n for n in range(1, len(fed) + 1) if sum(sizes[:n]) >= len(prompt))
    assert chunks >= 4 and [t for ids, _ in fed[:chunks] for t in ids] == prompt  # several steps' chunks
    assert set(sizes[chunks:]) == {1}  # then one forward per decoded token
    kv_ids = engine.get_session("chunked").kv_ids
    assert kv_ids[: len(prompt)] == prompt and len(kv_ids) > len(prompt)

    ref = from_backend(real, kv_budget=1024 * kv, kernel="tiled", linear=engine.config.linear)
    seq = KVSeq(ref.pool)
    want = [ref.forward([Feed(seq, prompt)])[0]]  # at once
    want += [ref.forward([Feed(seq, [t])])[0] for t in kv_ids[len(prompt):]]
    got = [logits for _, logits in fed[chunks - 1 :]]  # the last chunk's, then every decode's
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), i
    s = engine.get_session("chunked")
    for (k, v), (rk, rv) in zip(engine.pool.read(s.kv.blocks, len(s.kv)), ref.pool.read(seq.blocks, len(seq)),
                                strict=True):
        assert torch.equal(k, rk) and torch.equal(v, rv)
    seq.release()


@pytest.mark.parametrize("command", ["serve", "chat", "calibrate"])
def test_bad_kernels_are_refused_by_the_flags_and_the_config(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for flag in ("--attention", "--linear"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([command, flag, "flash"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: invalid choice: 'flash'" in err
        assert all(repr(k) in err for k in (KERNELS if flag == "--attention" else LINEARS))
    with pytest.raises(ValueError, match=f"attention must be one of {', '.join(KERNELS)}, not 'flash'"):
        EngineConfig(attention="flash")
    with pytest.raises(ValueError, match=f"linear must be one of {', '.join(LINEARS)}, not 'blas'"):
        EngineConfig(linear="blas")


def test_other_kernels_than_the_defaults_are_refused_where_transformers_runs_the_model(mistral: HFBackend) -> None:
    budget = 1024 * mistral.info.kv_bytes_per_token
    for fields in ({"attention": "tiled"}, {"linear": "mkl"}):
        with pytest.raises(ValueError, match="choose kernels of the own forward"):
            Engine(mistral, config=EngineConfig(kv_budget=budget, **fields))
    Engine(mistral, config=EngineConfig(kv_budget=budget))  # the defaults are what it runs anyway


@pytest.mark.real
@pytest.mark.parametrize("linear", LINEARS)
def test_the_kernel_flags_build_the_runner_with_those_kernels(linear: str, real: HFBackend) -> None:
    """``serve`` (one server, and each replica, whose flags travel as a dict), ``chat`` and
    ``calibrate`` all hand the kernels to the engine's runner."""
    budget = ["--kv-budget", "16MiB"]
    chosen = ["--attention", "tiled", "--linear", linear, *budget]
    parser = build_parser()
    serve = server_config(parser.parse_args(["serve", *chosen]))
    replica = server_config(parser.parse_args(["serve", *flags({"attention": "tiled", "linear": linear}), *budget]))
    chat = engine_config(parser.parse_args(["chat", *chosen]))
    calibrate = engine_config(parser.parse_args(["calibrate", *chosen]))
    for config in (serve.engine, replica.engine, chat, calibrate):
        runner = Engine(real, config=config).runner
        assert isinstance(runner, Runner) and (runner.kernel, runner.linear) == ("tiled", linear)
    default = Engine(real, config=server_config(parser.parse_args(["serve", *budget])).engine).runner
    assert isinstance(default, Runner) and (default.kernel, default.linear) == ("sdpa", "onednn")


@pytest.mark.real
def test_the_bench_runs_its_modes_with_the_kernels_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[tuple[str, str]] = []  # the kernels of every engine the bench builds

    class Recorded(Engine):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            assert isinstance(self.runner, Runner)
            built.append((self.runner.kernel, self.runner.linear))

    monkeypatch.setattr(bench_runner, "Engine", Recorded)
    report = tmp_path / "r.json"
    rc = main(["--log-level", "WARNING", "bench", "--workload", "chat", "--sessions", "1", "--turns", "1",
               "--max-tokens", "2", "--gaps", "fixed:0", "--modes", "stateless,session", "--attention", "tiled",
               "--linear", "mkl", "--no-progress", "--json", str(report)])
    assert rc == 0
    model = json.loads(report.read_text())["model"]
    assert (model["attention"], model["linear"]) == ("tiled", "mkl")
    assert built[1:] == [("tiled", "mkl")] * 2  # after the warm-up, one engine per mode
