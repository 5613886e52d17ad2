"""``worker export-tokenizer``: the folder it writes loads offline in ``transformers`` and counts
tokens exactly as the server does (what AIPerf and guidellm rely on)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from workers.engine.tokenizer import HFTokenizer
from workers.engine.tokenizer_export import export_tokenizer, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["The capital of France is", "12345 digits, one by one", "naïve café — 東京 🎉",
         "<|im_start|>user\nhi<|im_end|>\n", "  leading and trailing spaces  "]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def _export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", "export-tokenizer", *args],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                          text=True, timeout=120)


def test_exported_smollm2_tokenizer_loads_offline_and_matches(tmp_path, monkeypatch):
    out = tmp_path / "tok"
    done = _export_cli(str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(out)) == ["special_tokens_map.json", "tokenizer.json",
                                       "tokenizer_config.json"]
    ours, context = load_tokenizer("smollm2-135m")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == context == 8192
    assert config["chat_template"] == ours.chat_template

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    theirs = AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        assert theirs.encode(text) == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == text
    assert theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) \
        == ours.apply_chat_template(MESSAGES)
    assert theirs.eos_token_id in ours.eos_token_ids


def test_a_bos_model_gets_its_bos_from_the_file(tmp_path):
    """The engine adds the BOS itself; readers of tokenizer.json need its post-processor to."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<s>": 0, "</s>": 1, **{chr(c): c - 95 for c in range(97, 123)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = HFTokenizer(raw, bos_token_id=0, eos_token_ids=[1], add_bos=True)
    from workers.engine import tokenizer_export
    paths = tokenizer_export.write_folder(tok, 4096, str(tmp_path))
    written = Tokenizer.from_file(paths[0])
    for text in ("abc", "zyx"):
        assert written.encode(text).ids == tok.encode(text) == [0] + tok.encode(text)[1:]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["add_bos_token"] is True
    # the engine's own tokenizer is left as it was: no BOS from its post-processor
    assert raw.encode("abc").ids == tok.encode("abc")[1:]


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="'tiny' has a byte vocabulary"):
        export_tokenizer("tiny", str(tmp_path))
    with pytest.raises(ValueError, match="unknown model 'nope.bin'"):
        export_tokenizer("nope.bin", str(tmp_path))
    assert _export_cli(str(tmp_path)).returncode == 0
    again = _export_cli(str(tmp_path))
    assert again.returncode == 2 and "exists: pass --overwrite" in again.stderr
    assert _export_cli("--overwrite", str(tmp_path)).returncode == 0
