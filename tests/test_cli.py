"""The `prism` command line, driven in-process against a tiny random Llama saved to disk.

The tiny target has the default target's tokenizer (and chat template) but hidden size 32 and
two layers, so every command runs in well under a second.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_chat_target

from prism_spec import cli, cli_common

# Tiny models gain nothing from a second thread, and on a shared 2-core machine it makes them
# far slower (the `one_thread` fixture lives in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

FIELDS = {
    "prompt": str,
    "text": str,
    "token_ids": list,
    "finish_reason": str,
    "new_tokens": int,
    "acceptance_length": (int, float),
    "tokens_per_s": (int, float),
    "method": str,
}


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> str:
    return tiny_chat_target(tmp_path_factory.mktemp("tiny-target"))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `prism *argv` in-process; argparse's SystemExit becomes an exit code."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def read_jsonl(path) -> list[dict]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def check_records(records, prompts, method, max_new_tokens):
    assert [r["prompt"] for r in records] == prompts
    for r in records:
        assert set(r) == set(FIELDS)
        for key, kind in FIELDS.items():
            assert isinstance(r[key], kind), (key, r[key])
        assert r["new_tokens"] == len(r["token_ids"])
        assert 1 <= r["new_tokens"] <= max_new_tokens
        assert all(isinstance(t, int) and 0 <= t < 49152 for t in r["token_ids"])
        assert r["finish_reason"] in {"eos", "stop", "length", "context"}
        assert r["method"] == method
        assert r["tokens_per_s"] > 0


GEN = ("generate", "--max-new-tokens", 12)


# ---------------------------------------------------------------------- generate
def test_generate_args_and_file_match_vanilla(tiny_target, tmp_path, capsys):
    prompts = ["Hello there!", "What is the capital of France?"]
    spec_out = tmp_path / "spec.jsonl"
    rc, _, err = run_cli(capsys, *GEN, *prompts, "--target", tiny_target, "--drafter", "layers:1", "-o", spec_out)
    assert rc == 0, err
    spec = read_jsonl(spec_out)
    check_records(spec, prompts, "standard", 12)
    # A drafter that is the whole target (both layers) has every draft accepted: a chain of 3
    # commits 4 tokens a round, so the recorded acceptance length is 4 (the last round may be
    # cut short by EOS).
    rc, _, err = run_cli(capsys, *GEN, *prompts, "--target", tiny_target, "--drafter", "layers:2", "--tree", "chain:3",
                         "-o", tmp_path / "whole.jsonl")
    assert rc == 0, err
    whole = read_jsonl(tmp_path / "whole.jsonl")
    for record, standard in zip(whole, spec):
        assert record["token_ids"] == standard["token_ids"]
        assert record["acceptance_length"] == pytest.approx(record["new_tokens"] / -(-record["new_tokens"] // 4))
    assert whole[0]["new_tokens"] == 12 and whole[0]["acceptance_length"] == 4.0

    # Same prompts from a plain text file (blank lines skipped), vanilla decoding.
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(f"{prompts[0]}\n\n{prompts[1]}\n", encoding="utf-8")
    van_out = tmp_path / "vanilla.jsonl"
    rc, _, err = run_cli(capsys, *GEN, "--file", prompt_file, "--target", tiny_target, "--vanilla", "-o", van_out)
    assert rc == 0, err
    vanilla = read_jsonl(van_out)
    check_records(vanilla, prompts, "vanilla", 12)
    assert all(r["acceptance_length"] in (0.0, 1.0) for r in vanilla)

    # And from JSON lines, with --drafter none meaning vanilla too.
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    none_out = tmp_path / "none.jsonl"
    rc, _, err = run_cli(capsys, *GEN, "--file", jsonl, "--target", tiny_target, "--drafter", "none", "-o", none_out)
    assert rc == 0, err
    untimed = lambda records: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]  # noqa: E731
    assert untimed(read_jsonl(none_out)) == untimed(vanilla)

    # Lossless at T=0: identical text and tokens with and without the drafter.
    for s, v in zip(spec, vanilla):
        assert s["token_ids"] == v["token_ids"]
        assert s["text"] == v["text"]
        assert s["finish_reason"] == v["finish_reason"]


def test_generate_with_static_cache_matches(tiny_target, tmp_path, capsys):
    outs = {}
    for flag in ((), ("--static-cache",)):
        out = tmp_path / f"out{len(flag)}.jsonl"
        rc, _, err = run_cli(capsys, *GEN, "Hello there!", "--target", tiny_target, "--drafter", "layers:1", *flag,
                             "-o", out)
        assert rc == 0, err
        outs[flag] = [r["token_ids"] for r in read_jsonl(out)]
    assert outs[()] == outs[("--static-cache",)]


def test_row_invariant_where_the_kernels_do_not_allow_it(tiny_target, capsys, monkeypatch):
    from prism_spec.targets import row_invariance

    monkeypatch.setattr(row_invariance, "rows_invariant", lambda *a, **k: False)
    rc, _, err = run_cli(capsys, *GEN, "Hello there!", "--target", tiny_target, "--dtype", "bfloat16", "--row-invariant")
    assert rc == 2 and "error: --row-invariant: no split" in err and "Traceback" not in err


def test_generate_row_invariant_bf16(tiny_target, tmp_path, capsys):
    """--row-invariant: speculative output equals vanilla output in the same mode (bf16)."""
    outs = {}
    for drafter in ("none", "layers:1"):
        out = tmp_path / f"{drafter.replace(':', '')}.jsonl"
        rc, _, err = run_cli(capsys, *GEN, "Hello there!", "Tell me more.", "--target", tiny_target, "--drafter",
                             drafter, "--dtype", "bfloat16", "--row-invariant", "-o", out)
        if rc != 0 and "not available here" in err:
            pytest.skip(f"this machine's kernels: {err.strip()}")
        assert rc == 0, err
        outs[drafter] = [r["token_ids"] for r in read_jsonl(out)]
    assert outs["none"] == outs["layers:1"]


def test_generate_without_packed_weights_matches(tiny_target, tmp_path, capsys):
    outs = {}
    for flag in ((), ("--no-packed-weights",)):
        out = tmp_path / f"packed{len(flag)}.jsonl"
        rc, _, err = run_cli(capsys, *GEN, "Hello there!", "--target", tiny_target, "--drafter", "layers:1",
                             "--dtype", "float32", *flag, "-o", out)
        assert rc == 0, err
        outs[flag] = [r["token_ids"] for r in read_jsonl(out)]
    assert outs[()] == outs[("--no-packed-weights",)]


def test_cuda_graphs_on_a_cpu_target_is_a_clear_error(tiny_target, capsys):
    rc, _, err = run_cli(capsys, *GEN, "Hello there!", "--target", tiny_target, "--cuda-graphs")
    assert rc == 2
    assert "error:" in err and "--cuda-graphs needs a CUDA device" in err


def test_generate_to_stdout_and_stdin(tiny_target, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"prompt": "from stdin"}\n'))
    rc, out, err = run_cli(capsys, *GEN, "first", "--stdin", "--no-chat", "--target", tiny_target, "--vanilla")
    assert rc == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    check_records(records, ["first", "from stdin"], "vanilla", 12)


def test_generate_stream_prints_text_and_writes_output(tiny_target, tmp_path, capsys):
    out_file = tmp_path / "out.jsonl"
    rc, out, err = run_cli(capsys, *GEN, "Tell me a story.", "--stream", "--target", tiny_target, "--drafter",
                           "layers:1", "--tree", "chain:3", "-o", out_file)
    assert rc == 0, err
    (record,) = read_jsonl(out_file)
    assert out == record["text"] + "\n"
    assert "tokens/s" in err


def test_generate_sampling_is_reproducible_with_a_seed(tiny_target, capsys):
    args = ("generate", "--max-new-tokens", 4, "Hi", "--target", tiny_target, "--temperature", "0.8", "--top-p", "0.9",
            "--top-k", "50", "--seed", "3", "--drafter", "layers:1", "--tree", "chain:2")
    first = run_cli(capsys, *args)
    second = run_cli(capsys, *args)
    assert first[0] == second[0] == 0, first[2]
    assert json.loads(first[1])["token_ids"] == json.loads(second[1])["token_ids"]


# ---------------------------------------------------------------------- argparse errors
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["generate", "x", "--temperature", "-1"], "--temperature"),
        (["generate", "x", "--temperature", "hot"], "--temperature"),
        (["generate", "x", "--top-p", "1.5"], "--top-p"),
        (["generate", "x", "--top-k", "-2"], "--top-k"),
        (["generate", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "x", "--tree", "bushy"], "bad tree spec 'bushy'"),
        (["generate", "x", "--tree", "chain:x"], "chain:N needs an integer"),
        (["demo", "--dtype", "float8"], "unknown dtype"),
        (["demo", "--max-new-token", "5"], "unrecognized arguments: --max-new-token 5"),  # no abbreviations
        (["demo", "--prompt"], "--prompt: expected one argument"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments_exit_non_zero_with_a_message(argv, needle, capsys):
    rc, out, err = run_cli(capsys, *argv)
    assert rc != 0
    assert "usage: prism" in err and "error:" in err and needle in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------- runtime errors
@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_an_error(prompt, capsys):
    rc, out, err = run_cli(capsys, "generate", prompt)
    assert rc == 2
    assert err.startswith("error:") and "empty" in err
    assert out == ""


def test_empty_prompt_in_a_jsonl_file_and_no_prompts(tmp_path, capsys):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
    rc, _, err = run_cli(capsys, "generate", "--file", jsonl)
    assert rc == 2 and err.startswith("error: prompt 2 is empty")

    jsonl.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    rc, _, err = run_cli(capsys, "generate", "--file", jsonl)
    assert rc == 2 and err.startswith("error:") and "line 2" in err and '"prompt"' in err

    rc, _, err = run_cli(capsys, "generate")
    assert rc == 2 and err.startswith("error: no prompts")


def test_missing_prompt_file(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    rc, out, err = run_cli(capsys, "generate", "--file", missing)
    assert rc == 2
    assert err.startswith("error:") and "not found" in err and "nope.txt" in err
    assert "Traceback" not in err


def test_missing_target_and_output_folder(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "generate", "hi", "--target", tmp_path / "no-such-model")
    assert rc == 2 and err.startswith("error:") and "not found" in err
    rc, _, err = run_cli(capsys, "generate", "hi", "-o", tmp_path / "no-dir" / "out.jsonl")
    assert rc == 2 and err.startswith("error:") and "no-dir" in err


def test_bad_drafter_specs(tiny_target, tmp_path, capsys):
    rc, _, err = run_cli(capsys, *GEN, "hi", "--target", tiny_target, "--drafter", "layers:9")
    assert rc == 2 and err.startswith("error:") and "layers:9" in err
    rc, _, err = run_cli(capsys, *GEN, "hi", "--target", tiny_target, "--drafter", tmp_path / "missing-ckpt")
    assert rc == 2 and err.splitlines()[-1].startswith("error:") and "not found" in err
    # An existing folder that is not a drafter checkpoint.
    rc, _, err = run_cli(capsys, *GEN, "hi", "--target", tiny_target, "--drafter", tmp_path)
    assert rc == 2 and err.splitlines()[-1].startswith("error:") and "not a drafter checkpoint" in err


def test_drafter_checkpoints_from_a_path(tiny_target, tmp_path, capsys):
    from prism_spec.drafters import FeatureDrafterConfig, FeatureDrafterModel, StandardDrafter
    from prism_spec.drafters.checkpoint import save_feature_drafter, save_standard_drafter
    from prism_spec.targets import load_target

    target = load_target(tiny_target)
    save_standard_drafter(StandardDrafter.from_target_layers(target, 1), target, tmp_path / "standard")
    torch.manual_seed(0)
    save_feature_drafter(FeatureDrafterModel(FeatureDrafterConfig.for_target(target), target), tmp_path / "eagle")

    rc, out, err = run_cli(capsys, *GEN, "Hello", "--target", tiny_target, "--vanilla")
    assert rc == 0, err
    vanilla = json.loads(out)
    for name, method in (("standard", "standard"), ("eagle", "eagle")):
        rc, out, err = run_cli(capsys, *GEN, "Hello", "--target", tiny_target, "--drafter", tmp_path / name)
        assert rc == 0, err
        record = json.loads(out)
        assert record["method"] == method
        assert record["token_ids"] == vanilla["token_ids"]

    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(capsys, *GEN, "Hello", "--target", tiny_target, "--drafter", tmp_path / "empty")
    assert rc == 2 and err.splitlines()[-1].startswith("error:") and "config.json" in err


def test_failed_run_leaves_existing_output_untouched(tiny_target, tmp_path, capsys):
    out_file = tmp_path / "out.jsonl"
    out_file.write_text("old\n")
    too_long = "word " * 400  # the tiny target's context is 256 positions
    rc, _, err = run_cli(capsys, *GEN, "fine", too_long, "--target", tiny_target, "--vanilla", "-o", out_file)
    assert rc == 2 and err.splitlines()[-1].startswith("error:") and "context" in err
    assert out_file.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left


# ---------------------------------------------------------------------- demo and drafter resolution
def test_demo_on_the_tiny_target(tiny_target, capsys):
    rc, out, err = run_cli(capsys, "demo", "--target", tiny_target, "--max-new-tokens", 8, "--drafter", "layers:1",
                           "--no-warmup")
    assert rc == 0, err
    assert "--- vanilla reply" in out and "--- speculative reply" in out
    assert "speedup" in out and "identical    yes" in out
    assert "untrained stand-in: the target's first 1 layer" in out


@pytest.mark.parametrize("spec", ["none", " Vanilla "])
def test_demo_refuses_no_drafter_before_loading(spec, capsys, monkeypatch):
    """The demo compares two decodings, so a vanilla-only spec is a usage error, raised before
    any model is loaded (the target path here does not even exist)."""
    from prism_spec import cli_common

    monkeypatch.setattr(cli_common, "load_target_from_args", lambda args: pytest.fail("loaded a target"))
    rc, _, err = run_cli(capsys, "demo", "--target", "/no/such/model", "--drafter", spec, "--no-warmup")
    assert rc == 2
    assert "pick a drafter" in err and len(err.strip().splitlines()) == 1


def test_resolve_drafter(tiny_target):
    from prism_spec.drafters.resolve import DrafterSpecError, resolve_drafter
    from prism_spec.targets import load_target

    target = load_target(tiny_target)
    auto = resolve_drafter("auto", target)
    assert auto.drafter is not None and not auto.trained and "untrained stand-in" in auto.label
    assert resolve_drafter("none", target).drafter is None
    assert resolve_drafter("layers:2", target).drafter.lm.num_layers == 2
    with pytest.raises(DrafterSpecError):
        resolve_drafter("layers:two", target)


def test_resolve_drafter_weights(tiny_target, tmp_path):
    """--drafter-weights: int8 for a feature drafter (labelled), an error for a drafter that
    shares the target's layers, auto stays float on the torch engine."""
    from prism_spec.drafters import FeatureDrafterModel, prism_config
    from prism_spec.drafters.checkpoint import save_feature_drafter
    from prism_spec.drafters.resolve import DrafterSpecError, resolve_drafter
    from prism_spec.targets import load_target
    from prism_spec.targets.packed import int8_linear_available

    target = load_target(tiny_target)
    save_feature_drafter(FeatureDrafterModel(prism_config(target), target), tmp_path / "prism")
    assert resolve_drafter(str(tmp_path / "prism"), target, "auto").drafter.model.int8 is False
    assert "int8" not in resolve_drafter("layers:1", target, "auto").label
    with pytest.raises(DrafterSpecError, match="one of auto, float, int8"):
        resolve_drafter("layers:1", target, "int4")
    if not int8_linear_available():
        return
    int8 = resolve_drafter(str(tmp_path / "prism"), target, "int8")
    assert int8.drafter.model.int8 and int8.label.endswith(", int8 weights")
    with pytest.raises(DrafterSpecError, match="int8 weights are not available for untrained stand-in"):
        resolve_drafter("layers:1", target, "int8")


def test_console_entry_point_has_no_traceback(tmp_path):
    """The real process: exit codes and messages, no traceback, for user errors."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "prism_spec.cli", "generate", "--file", tmp_path / "x.txt"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------- the real default target
@pytest.mark.slow
def test_demo_on_the_default_target(capsys):
    rc, out, err = run_cli(capsys, "demo", "--max-new-tokens", 32)
    assert rc == 0, err
    assert "identical    yes" in out
    # `auto` loads the PRISM drafter packaged for the default target.
    assert "packaged prism drafter (smollm2-135m-prism)" in out


@pytest.mark.slow
def test_generate_on_the_default_target(tmp_path, capsys):
    out_file = tmp_path / "out.jsonl"
    rc, _, err = run_cli(capsys, "generate", "What is 2 + 2?", "--max-new-tokens", 24, "--drafter", "layers:4",
                         "-o", out_file)
    assert rc == 0, err
    (spec,) = read_jsonl(out_file)
    rc, out, err = run_cli(capsys, "generate", "What is 2 + 2?", "--max-new-tokens", 24, "--vanilla")
    assert rc == 0, err
    assert json.loads(out)["token_ids"] == spec["token_ids"]
    assert "4" in spec["text"]


def test_chat_multi_turn_reset_and_exit(tiny_target, capsys, monkeypatch):
    import io

    # Two turns, a reset, one more turn, then /exit; the 3rd reply must equal the 1st
    # (same conversation after /reset, greedy decoding).
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nAnd again?\n/reset\nHello there\n/exit\nignored\n"))
    code, out, err = run_cli(capsys, "chat", "--target", tiny_target, "--drafter", "layers:1", "--max-new-tokens", "6")
    assert code == 0
    replies = [line for line in out.splitlines() if line.strip()]
    assert len(replies) == 3
    assert replies[0] == replies[2]
    assert err.count("acceptance length") == 3
    assert "conversation cleared" in err


def test_chat_keeps_the_history(tiny_target, capsys, monkeypatch):
    """The second turn is rendered after the first question and the first reply, and its reply
    is the greedy continuation of that whole conversation, not of the second question alone."""
    from prism_spec.runtime import GenerationConfig, generate

    loaded, rendered = [], []
    load = cli_common.load_target_from_args

    def spy(args):
        target = load(args)
        render = target.render_chat

        def record(messages, **kwargs):
            rendered.append([dict(m) for m in messages])
            return render(messages, **kwargs)

        target.render_chat = record
        loaded.append(target)
        return target

    monkeypatch.setattr(cli_common, "load_target_from_args", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("My name is Ada.\nWhat is my name?\n"))
    code, out, err = run_cli(capsys, "chat", "--target", tiny_target, "--drafter", "layers:1", "--max-new-tokens", "6",
                             "--system", "Be brief.")
    assert code == 0, err
    assert len(rendered) == 2 and [m["role"] for m in rendered[0]] == ["system", "user"]
    first_reply = rendered[1][2]["content"]
    assert rendered[1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My name is Ada."},
                           {"role": "assistant", "content": first_reply}, {"role": "user", "content": "What is my name?"}]
    assert first_reply and out.startswith(first_reply + "\n") and out.endswith("\n")
    second_reply = out[len(first_reply) + 1 : -1]

    (target,) = loaded
    config = GenerationConfig(max_new_tokens=6)
    with_history = generate(target, target.render_chat(rendered[1]), None, config).text
    alone = generate(target, target.render_chat([rendered[1][0], rendered[1][3]]), None, config).text
    assert second_reply == with_history
    assert with_history != alone  # the reply depends on the first turn


def test_tree_label_spells_out_the_spec():
    from prism_spec.cli_common import tree_label
    from prism_spec.runtime.tree import TreeConfig

    assert tree_label(TreeConfig.parse("10/1/6")) == "10/1/6 (10 nodes with the root, 2 drafted levels, top-k 6)"
    assert tree_label(TreeConfig.parse("4/0/3")) == "4/0/3 (4 nodes with the root, 1 drafted level, top-k 3)"


@pytest.mark.parametrize("argv, flag, message", [
    (["generate", "--device", "banana", "hi"], "--device", "unknown device 'banana'"),
    (["generate", "--device", "cuda:x", "hi"], "--device", "unknown device 'cuda:x'"),
    (["bench", "--device", "banana"], "--device", "unknown device 'banana'"),
    (["generate", "--stop", "", "hi"], "--stop", "must not be empty"),
    (["generate", "--seed", str(2**64), "hi"], "--seed", "expected an integer in"),
    (["chat", "--seed", str(-(2**63) - 1)], "--seed", "expected an integer in"),
    (["bench", "--seed", "x"], "--seed", "expected an integer, got 'x'"),
    (["train", "--seed", str(2**32)], "--seed", "expected an integer in [0, 4294967295] (32 bits), got 4294967296"),
    (["train", "--seed", "-1"], "--seed", "expected an integer in [0, 4294967295] (32 bits), got -1"),
    (["corpus", "build", "--out", "x", "--shard-size", "0"], "--shard-size", "expected a positive integer"),
])
def test_bad_flag_values_exit_2_naming_the_flag(capsys, argv, flag, message):
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and f"error: argument {flag}: {message}" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused(capsys):
    rc, _, err = run_cli(capsys, "generate", "--device", "cuda", "hi")
    assert rc == 2 and "no CUDA device is available" in err and "Traceback" not in err


def test_a_tree_larger_than_the_context_is_refused(tiny_target, capsys):
    rc, out, err = run_cli(capsys, "generate", "hi", "--target", tiny_target, "--tree", "300/5/10")
    assert rc == 2 and out == ""
    (line,) = err.strip().splitlines()[-1:]
    assert line.startswith("error: --tree 300/5/10:") and "context of 256" in line
    assert "Traceback" not in err


def test_bench_refuses_a_tree_larger_than_the_context(tiny_target, tmp_path, capsys):
    out = tmp_path / "bench"
    rc, stdout, err = run_cli(capsys, "bench", "--target", tiny_target, "--tree", "300/5/10", "--method", "vanilla",
                              "--method", "standard=layers:1", "--bench", "qa", "--limit", "1", "--out", out,
                              "--no-progress", "--no-warmup")
    assert rc == 2 and stdout == "" and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("prism bench: error: --tree 300/5/10:") and "context of 256" in line
    assert not (out / "bench.json").exists() and not (out / "runs.jsonl").exists()  # nothing half-started


def test_tree_bound_is_the_context():
    from prism_spec.options import TreeTooLargeError, check_tree_fits
    from prism_spec.runtime.tree import TreeConfig

    check_tree_fits(TreeConfig.parse("255/5/10"), 256)  # one position left for the prompt
    with pytest.raises(TreeTooLargeError, match=r"^--totals 256/5/10: .*context of 256 positions"):
        check_tree_fits(TreeConfig.parse("256/5/10"), 256, "--totals")


# ---------------------------------------------------------------------- serve options
def test_serve_limits_and_access_options():
    serve = cli.build_parser().get_default("_subparsers")["serve"]
    args = serve.parse_args([])
    assert (args.max_tokens_cap, args.max_body_bytes, args.api_key, args.docs) == (None, None, None, False)
    args = serve.parse_args(["--max-tokens-cap", "64", "--max-body-bytes", "2048", "--api-key", "k", "--docs"])
    assert (args.max_tokens_cap, args.max_body_bytes, args.api_key, args.docs) == (64, 2048, "k", True)


@pytest.mark.parametrize("argv, flag, message", [
    (["serve", "--max-tokens-cap", "0"], "--max-tokens-cap", "expected a positive integer"),
    (["serve", "--max-body-bytes", "lots"], "--max-body-bytes", "expected a positive integer"),
    (["serve", "--api-key", ""], "--api-key", "must not be empty"),
])
def test_bad_serve_flags_exit_2_naming_the_flag(capsys, argv, flag, message):
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and f"error: argument {flag}: {message}" in err


def test_serving_beyond_localhost_without_a_key_is_warned_about():
    from prism_spec.serve_cli import exposure_warning

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, None) is None
    for host in ("0.0.0.0", "192.168.1.5", "::", "myhost.example"):
        warning = exposure_warning(host, None)
        assert warning.startswith("warning:") and host in warning and "--api-key" in warning
        assert exposure_warning(host, "a-key") is None


def test_serve_takes_its_api_key_from_the_environment(tiny_target, monkeypatch, capsys):
    """run_serve with uvicorn.run replaced: the app it would serve requires PRISM_API_KEY."""
    import httpx
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(app=app, **kwargs))
    monkeypatch.setenv("PRISM_API_KEY", "from-env")
    rc, _, err = run_cli(capsys, "serve", "--target", tiny_target, "--drafter", "none", "--host", "0.0.0.0")
    assert rc == 0 and "API key required" in err and "warning:" not in err

    async def get(headers):
        transport = httpx.ASGITransport(app=served["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return (await http.get("/v1/models", headers=headers)).status_code

    import asyncio

    assert asyncio.run(get({})) == 401
    assert asyncio.run(get({"Authorization": "Bearer from-env"})) == 200
    monkeypatch.delenv("PRISM_API_KEY")
    rc, _, err = run_cli(capsys, "serve", "--target", tiny_target, "--drafter", "none", "--host", "0.0.0.0")
    assert rc == 0 and "warning: --host 0.0.0.0" in err
