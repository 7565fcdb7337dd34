"""The jaxpass command line: pass-list parsing and a full run on a tiny GGUF model."""

import json

import pytest

from jaxpass import cli, models
from jaxpass.models import configs


def test_parse_passes():
    assert cli.parse_passes("") == []
    with pytest.raises(cli.CliError, match="unknown pass 'nosuchpass'"):
        cli.parse_passes("nosuchpass(x=1)")
    with pytest.raises(cli.CliError, match="literals"):
        cli.parse_passes("quantize(weights=open('x'))")
    with pytest.raises(cli.CliError, match="expected a pass call"):
        cli.parse_passes("1 + 2")
    try:
        from jaxpass.passes import Quantize
    except ImportError:
        return
    (p,) = cli.parse_passes("quantize(weights='int8')")
    assert isinstance(p, Quantize)


def test_cli_runs_on_a_tiny_gguf(tmp_path, gguf_writer, capsys):
    path = tmp_path / "tiny.gguf"
    config = configs.tiny(vocab_size=300, num_layers=1)
    gguf_writer(path, models.random_model(config, seed=1))
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = cli.main(["--model", str(path), "--passes", "", "--context", "32", "--windows", "1",
                   "--passkey-trials", "0", "--gen-tokens", "0",
                   "--out", str(out), "--plot", str(png)])
    assert rc == 0
    result = json.loads(out.read_text())
    original = result["results"][0]
    assert original["name"] == "original" and original["errors"] == {}
    assert original["perplexity"] > 1 and original["param_bytes"] > 0
    assert original["kv_bytes_per_token"] == config.kv_bytes_per_token()
    assert png.stat().st_size > 0
    if result["transform_error"] is None:  # the core is present: identity transform
        assert result["results"][1]["perplexity"] == pytest.approx(original["perplexity"], rel=1e-5)


def test_cli_reports_missing_model(capsys):
    assert cli.main(["--model", "/nonexistent.gguf", "--passes", ""]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
