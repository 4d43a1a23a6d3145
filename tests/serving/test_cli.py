"""The jaxdyn command line: generate on dummy weights and on a HF directory; clear errors."""

import time

import pytest

from serving.cli import main
from tests.support import hf_greedy, hf_model, make_hf_checkpoint


def test_generate_matches_transformers_greedy(tmp_path, capsys):
    path = make_hf_checkpoint("llama3.1", str(tmp_path / "m"))
    assert main(["generate", "--model", path, "--prompt-ids", "5,6,7,8", "--max-tokens", "6",
                 "--ignore-eos", "--dtype", "float32"]) == 0
    got = [int(t) for t in capsys.readouterr().out.split()]
    want, _ = hf_greedy(hf_model(path), [5, 6, 7, 8], 6)
    assert got == want


def test_generate_dummy_preset(capsys):
    assert main(["generate", "--model", "tiny", "--load-format", "dummy", "--prompt-ids", "1 2 3",
                 "--max-tokens", "4", "--ignore-eos"]) == 0
    out = capsys.readouterr().out.split()
    assert len(out) == 4 and all(0 <= int(t) < 512 for t in out)


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/dir", "--prompt-ids", "1"], "no such directory"),
    (["--model", "nope", "--load-format", "dummy", "--prompt-ids", "1"], "neither a directory nor a preset"),
    (["--model", "tiny", "--load-format", "dummy", "--prompt-ids", "1,x"], "comma-separated integers"),
    (["--model", "tiny", "--load-format", "dummy", "--prompt-ids", "1,99999"], "token ids must be integers in"),
    (["--model", "tiny", "--load-format", "dummy", "--prompt-ids", "1", "--max-tokens", "0"], "--max-tokens"),
    # more TP than devices (the 1B shape's 32 heads split over 32; the tiny model's 4 do not over 64: next case)
    (["--model", "llama-3.2-1b", "--load-format", "dummy", "--prompt-ids", "1", "--tp", "32"], "device(s)"),
    (["--model", "tiny", "--load-format", "dummy", "--prompt-ids", "1", "--tp", "64"],
     "the model's 4 attention heads do not split over 64 devices"),
    (["--model", "tiny", "--load-format", "dummy", "--prompt", "hi"], "has no tokenizer"),
    (["--model", "tiny", "--load-format", "dummy", "--prompt-ids", "1", "--temperature", "-1"], "--temperature"),
])
def test_generate_errors_name_the_problem(argv, message, capsys):
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "1"]) == 2
    assert "GPT2LMHeadModel" in capsys.readouterr().err


def test_serve_prefix_cache_is_on_by_default_and_can_be_turned_off():
    from serving.cli import _engine_config, build_parser
    assert _engine_config(build_parser().parse_args(["serve"])).enable_prefix_caching is True
    assert _engine_config(build_parser().parse_args(["serve", "--no-prefix-cache"])).enable_prefix_caching is False


def test_gpu_memory_utilization_reaches_the_engine_config():
    from serving.cli import _engine_config, build_parser
    for command in (["serve"], ["worker", "--role", "both"], ["bench", "offline"]):
        assert _engine_config(build_parser().parse_args(command)).gpu_memory_utilization is None
        args = build_parser().parse_args([*command, "--gpu-memory-utilization", "0.6"])
        assert _engine_config(args).gpu_memory_utilization == 0.6


def test_serve_compiles_first_steps_alone_unless_told_otherwise():
    from serving.cli import _engine_config, build_parser
    assert _engine_config(build_parser().parse_args(["serve"])).first_compiles_alone is False
    args = build_parser().parse_args(["serve", "--first-compiles-alone"])
    assert _engine_config(args).first_compiles_alone is True


def test_serve_triton_gemm_limit_flag():
    from serving.cli import CLIError, _engine_config, build_parser
    parse = build_parser().parse_args
    assert _engine_config(parse(["serve"])).triton_gemm_max_tokens == "auto"
    assert _engine_config(parse(["serve", "--triton-gemm-max-tokens", "all"])).triton_gemm_max_tokens is None
    assert _engine_config(parse(["serve", "--triton-gemm-max-tokens", "0"])).triton_gemm_max_tokens == 0
    assert _engine_config(parse(["serve", "--triton-gemm-max-tokens", "128"])).triton_gemm_max_tokens == 128
    for bad, says in (("lots", "expected an integer, auto or all"), ("-1", "at least 0")):
        with pytest.raises(CLIError, match=says):
            _engine_config(parse(["serve", "--triton-gemm-max-tokens", bad]))


def test_serve_fp8_kernel_limit_flag():
    from jaxdyn.engine.core import FP8_KERNEL_MAX_TOKENS
    from serving.cli import CLIError, _engine_config, build_parser
    parse = build_parser().parse_args
    assert _engine_config(parse(["serve"])).fp8_kernel_max_tokens == "auto"
    assert _engine_config(parse(["serve", "--fp8-kernel-max-tokens", "0"])).fp8_kernel_max_tokens == 0
    assert _engine_config(parse(["serve", "--fp8-kernel-max-tokens", "16"])).fp8_kernel_max_tokens == 16
    for bad, says in (("some", "expected an integer, auto"), ("-2", "at least 0")):
        with pytest.raises(CLIError, match=says):
            _engine_config(parse(["serve", "--fp8-kernel-max-tokens", bad]))
    assert _engine_config(parse(["serve"])).fp8_fused_quantize == "auto"
    for site in ("off", "o_proj", "all"):
        assert _engine_config(parse(["serve", "--fp8-fused-quantize", site])).fp8_fused_quantize == site
    assert _engine_config(parse(["serve"])).fp8_fused_quantize_min_tokens == "auto"
    for option, bad in (("fp8_fused_norm", "yes"), ("fused_rope_kv", "1")):
        name = "--" + option.replace("_", "-")
        for flag, value in ((None, "auto"), ("on", True), ("off", False)):
            got = getattr(_engine_config(parse(["serve"] + ([] if flag is None else [name, flag]))), option)
            assert got == value and type(got) is type(value), (option, flag, got)
        with pytest.raises(SystemExit):
            parse(["serve", name, bad])
    assert _engine_config(parse(["serve"])).separate_sampler is False
    assert _engine_config(parse(["serve"])).skip_idle_prefill is False
    assert _engine_config(parse(["serve", "--skip-idle-prefill"])).skip_idle_prefill is True
    assert _engine_config(parse(["serve"])).attention_fp8_products == "off"
    assert _engine_config(parse(["serve", "--kv-cache-dtype", "fp8", "--attention-fp8-products", "qk"])
                          ).attention_fp8_products == "qk"
    with pytest.raises(CLIError, match="needs --kv-cache-dtype fp8"):
        _engine_config(parse(["serve", "--attention-fp8-products", "qk_pv"]))
    with pytest.raises(CLIError, match="takes a 16-bit model"):
        _engine_config(parse(["serve", "--dtype", "float32", "--kv-cache-dtype", "fp8", "--attention-fp8-products",
                              "qk"]))
    assert _engine_config(parse(["bench", "offline", "--skip-idle-prefill"])).skip_idle_prefill is True
    assert _engine_config(parse(["serve", "--separate-sampler"])).separate_sampler is True
    assert _engine_config(parse(["serve"])).sampler_switch is None          # by device: the runner decides
    assert _engine_config(parse(["serve", "--sampler-switch", "off"])).sampler_switch is False
    assert _engine_config(parse(["serve", "--sampler-switch", "off", "--separate-sampler"])).separate_sampler is True
    assert _engine_config(parse(["serve", "--sampler-switch"])).sampler_switch is True
    assert _engine_config(parse(["bench", "offline", "--sampler-switch"])).sampler_switch is True
    assert _engine_config(parse(["serve", "--sampler-switch", "plain-full"])).sampler_switch == "plain_full"
    with pytest.raises(SystemExit):
        parse(["serve", "--sampler-switch", "greedy"])
    with pytest.raises(CLIError, match="pick one"):
        _engine_config(parse(["serve", "--sampler-switch", "plain-full", "--separate-sampler", "except-greedy"]))
    with pytest.raises(CLIError, match="--sampler-switch and --separate-sampler .* pick one"):
        _engine_config(parse(["serve", "--sampler-switch", "--separate-sampler"]))
    assert _engine_config(parse(["serve", "--separate-sampler", "except-greedy"])).separate_sampler == "except_greedy"
    with pytest.raises(SystemExit):
        parse(["serve", "--separate-sampler", "some"])
    assert _engine_config(parse(["serve"])).kv_cache_dtype == "auto"
    for name in ("fp8", "fp8_e4m3"):
        assert _engine_config(parse(["serve", "--kv-cache-dtype", name])).kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):       # argparse names the choices on stderr
        parse(["serve", "--kv-cache-dtype", "int4"])
    assert _engine_config(parse(["serve"])).attention_programs == 0
    assert _engine_config(parse(["serve", "--attention-programs", "1056"])).attention_programs == 1056
    with pytest.raises(CLIError, match="--attention-programs: expected an integer >= 0"):
        _engine_config(parse(["serve", "--attention-programs", "-4"]))
    assert _engine_config(parse(["serve"])).seq_buckets == ()
    got = _engine_config(parse(["serve", "--max-num-batched-tokens", "2048", "--max-num-seqs", "1024",
                                "--seq-buckets", "2048:512, 1024:256"]))
    assert got.seq_buckets == ((1024, 256), (2048, 512))
    for bad, match in (("2048", "TOKENS:SEQS"), ("2048:x", "TOKENS:SEQS"), ("2048:1024", "fewer sequence slots"),
                       ("1000:4", "token bucket")):
        with pytest.raises(CLIError, match=f"--seq-buckets: .*{match}"):
            _engine_config(parse(["serve", "--max-num-batched-tokens", "2048", "--max-num-seqs", "1024",
                                  "--seq-buckets", bad]))
    assert _engine_config(parse(["serve"])).prefill_programs is None
    assert _engine_config(parse(["serve", "--prefill-programs", "1056"])).prefill_programs == 1056
    with pytest.raises(CLIError, match="--prefill-programs: expected an integer >= 0"):
        _engine_config(parse(["serve", "--prefill-programs", "-1"]))
    assert _engine_config(parse(["serve"])).schedule_policy == "fcfs"
    assert _engine_config(parse(["serve", "--schedule-policy", "lof"])).schedule_policy == "lof"
    with pytest.raises(SystemExit):
        parse(["serve", "--schedule-policy", "sjf"])
    flag = "--fp8-fused-quantize-min-tokens"
    assert _engine_config(parse(["serve", flag, "200"])).fp8_fused_quantize_min_tokens == 200
    with pytest.raises(CLIError, match=f"{flag}: expected an integer, auto"):
        _engine_config(parse(["serve", flag, "big"]))
    # the help states the default the engine resolves "auto" to
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions
                  if "--fp8-kernel-max-tokens" in a.option_strings)
    assert f"auto (default): {FP8_KERNEL_MAX_TOKENS} on a GPU" in action.help


def test_generate_quantizes_a_hf_checkpoint_as_it_loads(tmp_path, capsys, monkeypatch):
    """``--quantization fp8|int8`` on a Hugging Face directory: generates with the model quantized (the engine
    the CLI builds holds that quantization; greedy, its tokens equal the LLM's of the same quantization, which at
    this size are the float model's too); on a converted checkpoint of float weights it is refused, naming what to
    do; ``serve`` and ``bench offline`` take the flag too."""
    import jaxdyn.engine.llm as llm_module
    from jaxdyn import LLM, SamplingParams
    from serving.cli import build_parser
    from tests.support import make_byte_tokenizer
    path = make_hf_checkpoint("llama3.1", str(tmp_path / "m"))
    make_byte_tokenizer(path)
    built, build = [], llm_module.build_engine

    def recording(*args, **kwargs):
        engine = build(*args, **kwargs)
        built.append(engine.model_config.quantization)
        return engine
    monkeypatch.setattr(llm_module, "build_engine", recording)
    for quant in ("fp8", "int8"):
        assert main(["generate", "--model", path, "--prompt-ids", "5,6,7,8", "--max-tokens", "6", "--ignore-eos",
                     "--dtype", "float32", "--quantization", quant]) == 0
        assert built[-1] == quant
        got = [int(t) for t in capsys.readouterr().out.split()]
        llm = LLM(path, dtype="float32", quantization=quant, max_num_seqs=1, max_num_batched_tokens=16)
        assert llm.engine.model_config.quantization == quant
        want = llm.generate([5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids
        assert got == list(want)
    assert main(["convert", "--hf", path, "--out", str(tmp_path / "c"), "--dtype", "float32", "--quiet"]) == 0
    assert main(["generate", "--model", str(tmp_path / "c"), "--prompt-ids", "5", "--quantization", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "converted checkpoint of float weights" in err and "Traceback" not in err
    for cmd in (["serve"], ["bench", "offline"]):
        assert build_parser().parse_args([*cmd, "--quantization", "fp8"]).quantization == "fp8"


def test_serve_over_workers_refuses_quantization(capsys):
    """The workers load (and quantize) the model: ``serve --workers`` with ``--quantization`` says so, before
    any port opens."""
    assert main(["serve", "--model", "tiny", "--load-format", "dummy", "--workers", "127.0.0.1:1",
                 "--quantization", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "--workers and --quantization" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "99999"], "argument --port: a port is 0..65535, got 99999"),
    (["serve", "--port", "-1"], "argument --port: a port is 0..65535, got -1"),
    (["serve", "--port", "http"], "argument --port: expected a port number, got 'http'"),
    (["worker", "--role", "both", "--port", "70000"], "argument --port: a port is 0..65535, got 70000"),
    (["serve", "--served-model-name", ""], "argument --served-model-name: expected a non-empty name"),
    (["worker", "--role", "both", "--served-model-name", " "], "argument --served-model-name: expected a non-empty name"),
    (["serve", "--log-level", "bogus"], "argument --log-level: invalid choice: 'bogus'"),
])
def test_flags_out_of_range_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--model", "tiny", "--load-format", "dummy"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["serve", "--max-model-len", "-5"], "--max-model-len must be at least 1, got -5"),
    (["serve", "--max-model-len", "1000000000"], "--max-model-len 1000000000 exceeds the model's "
                                                 "max_position_embeddings (4096)"),
    (["generate", "--prompt-ids", "1", "--max-model-len", "0"], "--max-model-len must be at least 1, got 0"),
    (["generate", "--prompt-ids", "1", "--max-model-len", "5000"], "exceeds the model's max_position_embeddings"),
    (["bench", "offline", "--max-model-len", "5000"], "exceeds the model's max_position_embeddings"),
    (["serve", "--max-request-bytes", "0"], "--max-request-bytes must be at least 1"),
    (["serve", "--workers", "bogus"], "--workers: expected HOST:PORT[,HOST:PORT...], got 'bogus'"),
    (["serve", "--workers", "127.0.0.1:1,h:99999"], "got 'h:99999'"),
    (["serve", "--workers", "127.0.0.1:1", "--workers-wait", "0"], "--workers-wait: expected seconds > 0, got 0"),
    (["serve", "--workers", "127.0.0.1:1", "--workers-wait", "nan"], "--workers-wait: expected seconds > 0"),
    (["serve", "--tp", "0"], "--tp must be at least 1"),
    (["generate", "--prompt-ids", "1", "--tp", "0"], "--tp must be at least 1, got 0"),
    (["generate", "--prompt-ids", "1", "--tp", "-1"], "--tp must be at least 1, got -1"),
    (["serve", "--shutdown-grace", "nan"], "--shutdown-grace must be seconds >= 0, got nan"),
    (["serve", "--disagg", "--prefill-devices", "0", "--decode-devices", "1", "--disagg-prefill-timeout", "nan"],
     "the timeout seconds > 0 and at most 86400"),
    (["serve", "--disagg", "--prefill-devices", "0", "--decode-devices", "1", "--disagg-prefill-timeout", "inf"],
     "the timeout seconds > 0 and at most 86400"),
    (["worker", "--role", "decode", "--tp", "-1"], "--tp must be at least 1"),
    (["worker", "--role", "decode", "--devices", ","], "--devices: no device index in ','"),
    (["serve", "--disagg", "--prefill-devices", ",", "--decode-devices", "0"], "--prefill-devices: no device index"),
    (["serve", "--disagg", "--prefill-devices", "0", "--decode-devices", "1", "--max-num-batched-tokens", "256",
      "--seq-buckets", "256:32", "--prefill-max-num-batched-tokens", "128"],
     "--seq-buckets (the prefill engine's, --prefill-max-num-batched-tokens 128): seq_buckets: (256, 32)"),
    (["serve", "--disagg", "--prefill-devices", "0", "--decode-devices", "1", "--max-num-batched-tokens", "256",
      "--token-buckets", "16,256", "--prefill-max-num-batched-tokens", "512"],
     "--token-buckets: the largest (256) must be at least --prefill-max-num-batched-tokens (512)"),
    (["bench", "offline", "--seed", "-1"], "--seed must be at least 0, got -1"),
    (["serve", "--gpu-memory-utilization", "0"], "--gpu-memory-utilization: expected a fraction in (0, 1], got 0.0"),
    (["worker", "--role", "both", "--gpu-memory-utilization", "1.5"], "expected a fraction in (0, 1], got 1.5"),
    (["bench", "offline", "--gpu-memory-utilization", "nan"], "expected a fraction in (0, 1], got nan"),
    (["serve", "--workers", "127.0.0.1:1", "--gpu-memory-utilization", "0.5"], "--workers and --gpu-memory-utilization"),
    # flags that would be ignored: the engine's at a front end over workers, --disagg's without it
    (["serve", "--workers", "127.0.0.1:1", "--num-pages", "9"], "--workers and --num-pages: each worker runs its own"),
    (["serve", "--workers", "127.0.0.1:1", "--no-prefix-cache"], "--workers and --no-prefix-cache"),
    (["serve", "--workers", "127.0.0.1:1", "--no-executable-cache"], "--workers and --no-executable-cache:"),
    (["serve", "--prefill-devices", "0"], "--prefill-devices is for --disagg"),
    (["serve", "--disagg-prefill-timeout", "5"], "--disagg-prefill-timeout is for --disagg"),
    (["worker", "--role", "both", "--host", "bogus.invalid", "--port", "0"], "--host 'bogus.invalid':"),
    (["bench", "offline", "--out", "/proc/no/x.json"], "--out /proc/no/x.json:"),
    (["serve", "--tp", "3"], "--tp 3: the model's 4 attention heads do not split over 3 devices"),
    (["generate", "--prompt-ids", "1", "--tp", "3"], "--tp 3: the model's 4 attention heads"),
    (["bench", "offline", "--tp", "3"], "--tp 3: the model's 4 attention heads"),
])
def test_bad_values_are_named_before_anything_loads(argv, message, capsys):
    assert main([*argv, "--model", "tiny", "--load-format", "dummy"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


@pytest.mark.parametrize("command", [["serve"], ["worker", "--role", "both"]])
def test_a_port_in_use_is_named_before_the_model_loads(command, capsys):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main([*command, "--model", "tiny", "--load-format", "dummy", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err, err


def test_an_out_path_is_probed_before_a_run_and_nothing_is_left_behind(tmp_path):
    """``--out`` is checked by writing where the report will go, then undone: no file, no folder made for it, an
    existing file untouched; a path that cannot be written is a BenchError naming it."""
    from serving.bench import BenchError
    from serving.bench.report import check_writable
    check_writable(str(tmp_path / "a" / "b" / "x.json"))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept.json").write_text("{}")
    check_writable(str(tmp_path / "kept.json"))
    assert (tmp_path / "kept.json").read_text() == "{}" and len(list(tmp_path.iterdir())) == 1
    (tmp_path / "file").write_text("")
    with pytest.raises(BenchError, match="file is not a directory"):
        check_writable(str(tmp_path / "file" / "under" / "x.json"))
    with pytest.raises(BenchError, match="is a directory"):
        check_writable(str(tmp_path))


def test_bench_kernels_refuses_an_unwritable_report_before_measuring(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "kernels", "--quick", "--out", "/proc/no/x.md"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "jaxdyn bench kernels: error: --out /proc/no/x.md:" in err and "HBM" not in err


def test_bench_kernels_passes_every_argument_on(monkeypatch):
    """``jaxdyn bench kernels --quick --out x`` is benchmarks.kernels' own command line (argparse's REMAINDER
    had refused a leading --flag)."""
    from benchmarks import kernels
    seen = []
    monkeypatch.setattr(kernels, "main", lambda argv, prog=None: seen.append((argv, prog)))
    assert main(["bench", "kernels", "--quick", "--out", "x.md"]) == 0
    assert main(["bench", "kernels"]) == 0
    assert seen == [(["--quick", "--out", "x.md"], "jaxdyn bench kernels"), ([], "jaxdyn bench kernels")]


def test_serve_names_a_bad_generation_config(tmp_path, capsys):
    assert main(["serve", "--model", "tiny", "--load-format", "dummy", "--generation-config",
                 str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--generation-config" in err and "not a directory" in err and "Traceback" not in err
    (tmp_path / "generation_config.json").write_text('{"temperature": -1}')
    assert main(["serve", "--model", "tiny", "--load-format", "dummy", "--generation-config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "generation_config.json: temperature: must be in [0, 100]" in err


def test_llm_takes_its_default_sampling_params_from_the_generation_config(tmp_path):
    from jaxdyn import LLM, SamplingParams
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7}')
    p = LLM(engine=object(), generation_config=str(tmp_path)).get_default_sampling_params()
    assert (p.temperature, p.top_p, p.max_tokens, p.top_k) == (0.6, 0.9, 7, 0)
    assert LLM(engine=object(), generation_config="vllm").get_default_sampling_params() == SamplingParams()


def _options_set_before_the_devices(monkeypatch, capsys, argv, fraction, where, name, command):
    # build_engine's XLA options: the command-buffer mode, then the memory share (its refusal a CLI error), set
    # before the command's first look at its devices (``where.name``, stopped there)
    from jaxdyn.engine import xla_options
    from serving.cli import CLIError
    seen = []
    monkeypatch.setattr(xla_options, "command_buffer_update_mode", lambda: seen.append("mode"))
    monkeypatch.setattr(xla_options, "gpu_memory_fraction", seen.append)

    def devices(*a):
        seen.append("devices")
        raise CLIError("stopped at the devices")
    monkeypatch.setattr(where, name, devices)
    assert main(argv) == 2
    assert seen == ["mode", fraction, "devices"]
    assert "stopped at the devices" in capsys.readouterr().err

    def refuse(fraction):
        raise ValueError(f"gpu_memory_utilization={fraction}: JAX's backend has already started")
    monkeypatch.setattr(xla_options, "gpu_memory_fraction", refuse)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"jaxdyn {command}: error: gpu_memory_utilization={fraction}: JAX's backend has already started" in err
    assert "Traceback" not in err


def test_a_worker_sets_the_process_xla_options_before_its_devices(monkeypatch, capsys):
    import jax
    argv = ["worker", "--role", "both", "--port", "0", "--model", "tiny", "--load-format", "dummy",
            "--gpu-memory-utilization", "0.6"]
    _options_set_before_the_devices(monkeypatch, capsys, argv, 0.6, jax, "devices", "worker")


def test_disagg_serve_sets_the_process_xla_options_before_it_reads_its_devices(monkeypatch, capsys):
    import serving.cli as cli           # its _disagg_args reads jax.devices()
    argv = ["serve", "--disagg", "--prefill-devices", "0", "--decode-devices", "1", "--port", "0", "--model",
            "tiny", "--load-format", "dummy", "--gpu-memory-utilization", "0.7"]
    _options_set_before_the_devices(monkeypatch, capsys, argv, 0.7, cli, "_disagg_args", "serve")


def test_serve_answers_to_the_served_names_or_the_directory_and_the_path_given():
    from serving.cli import _served_names, build_parser
    parse = build_parser().parse_args
    assert _served_names(parse(["serve", "--model", "/m/Llama-3.1-8B/"]), "/m/Llama-3.1-8B/") == [
        "Llama-3.1-8B", "/m/Llama-3.1-8B/"]                      # vLLM's name (the path as given) too
    assert _served_names(parse(["serve", "--model", "tiny"]), "tiny") == ["tiny"]
    assert _served_names(parse(["serve"]), "/pkg/checkpoints/demo") == ["demo"]      # the demo: its name only
    args = parse(["serve", "--model", "/m/x", "--served-model-name", "a", "b", "a", "--port", "0"])
    assert _served_names(args, "/m/x") == ["a", "b"] and args.port == 0


def test_serve_lists_the_model_as_given_as_each_names_root(monkeypatch, capsys):
    # vLLM's /v1/models: each served name's root is the model path serve was given
    import serving.app as app
    from serving.cli import CLIError
    made = []

    def state(name, **kw):
        made.append((name, kw["aliases"], kw["model_root"]))
        raise CLIError("stopped at the server state")
    monkeypatch.setattr(app, "ServerState", state)
    assert main(["serve", "--model", "tiny", "--load-format", "dummy", "--served-model-name", "a", "b",
                 "--port", "0"]) == 2
    assert made == [("a", ("b",), "tiny")] and "stopped at the server state" in capsys.readouterr().err


def _out_of_memory(*a, **k):
    from jax.errors import JaxRuntimeError
    raise JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB with allocator "
                          "GPU_0_bfc on device 0.\nmore lines")


class _IdleServer:
    """uvicorn's server stood in for: runs until the loading thread tells it to exit (no sockets, no logging set
    up in the test's process)."""

    def __init__(self, state, config):
        self.started, self.should_exit, self.servers = False, False, []

    def run(self):
        deadline = time.monotonic() + 60
        while not self.should_exit and time.monotonic() < deadline:
            time.sleep(0.01)


def test_serve_names_an_engine_build_out_of_device_memory_and_what_to_change(monkeypatch, capsys):
    # the engine built on the server's thread (the engine process's own build: tests/serving/test_engine_process.py)
    import signal

    import uvicorn

    import jaxdyn.engine.llm as llm
    import serving.cli as cli
    monkeypatch.setattr(llm, "build_engine", _out_of_memory)
    monkeypatch.setattr(cli, "_DrainingServer", _IdleServer)
    monkeypatch.setattr(uvicorn, "Config", lambda *a, **k: None)     # its logging set up on the captured stderr
    monkeypatch.setattr(signal, "signal", lambda *a: None)          # serve's handlers left out of the test process
    assert main(["serve", "--model", "tiny", "--load-format", "dummy", "--port", "0", "--no-engine-process"]) == 2
    err = capsys.readouterr().err
    assert ("loading tiny failed: out of device memory while building the engine (RESOURCE_EXHAUSTED: Out of memory "
            "while trying to allocate 4.00GiB with allocator GPU_0_bfc on device 0.): give the KV cache fewer pages "
            "(--num-pages)") in err
    assert "Traceback" not in err and "more lines" not in err


def test_a_worker_names_an_engine_build_out_of_device_memory(monkeypatch, capsys):
    import jaxdyn
    monkeypatch.setattr(jaxdyn, "EngineCore", _out_of_memory)
    assert main(["worker", "--role", "both", "--port", "0", "--model", "tiny", "--load-format", "dummy"]) == 2
    err = capsys.readouterr().err
    assert "jaxdyn worker: error: out of device memory while building the engine (RESOURCE_EXHAUSTED" in err
    assert "--gpu-memory-utilization" in err and "Traceback" not in err
