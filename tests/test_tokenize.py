"""qconv tokenize: a text file as windows of token ids, with a tokenizer.json the user names (Hugging Face tokenizers)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from click.testing import CliRunner

from qconv.cli.main import cli
from qconv.data import token_windows
from tests.conftest import SAMPLES

tokenizers = pytest.importorskip("tokenizers")

VERSE = ("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
         "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n") * 6


def _byte_level_tokenizer(path):
    """Token id = byte value, as the sample decoder was trained (GPT-2's byte-to-character map, no merges)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.save(str(path))
    return path


def _bert_like_tokenizer(path):
    words = sorted(set(VERSE.replace("\n", " ").replace(";", " ").replace(".", " ").split()))
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, **{w: k + 3 for k, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok.save(str(path))
    return tok


def test_byte_level_windows_are_the_bytes_of_the_text(tmp_path):
    tok = tokenizers.Tokenizer.from_file(str(_byte_level_tokenizer(tmp_path / "tokenizer.json")))
    ids = token_windows(VERSE, tok, 64)
    raw = np.frombuffer(VERSE.encode(), np.uint8).astype(np.int64)
    assert ids.shape == (len(raw) // 64, 64)
    np.testing.assert_array_equal(ids.ravel(), raw[:ids.size])
    assert token_windows(VERSE, tok, 64, windows=3).shape == (3, 64)
    assert token_windows("Now is", tok, 64).tolist() == [list(b"Now is")]  # shorter than a window: the whole text


def test_windows_keep_the_tokenizers_framing(tmp_path):
    tok = _bert_like_tokenizer(tmp_path / "tokenizer.json")
    ids = token_windows(VERSE, tok, 10)
    assert ids.shape[1] == 10 and np.all(ids[:, 0] == 1) and np.all(ids[:, -1] == 2)
    body = ids[:, 1:-1].ravel()
    np.testing.assert_array_equal(body, tok.encode(VERSE, add_special_tokens=False).ids[:body.size])


def test_tokenized_text_calibrates_the_sample_decoder_to_int4(tmp_path):
    _byte_level_tokenizer(tmp_path / "tokenizer.json")
    text = tmp_path / "verse.txt"
    text.write_text(VERSE)
    prompts = tmp_path / "prompts.npz"
    r = CliRunner().invoke(cli, ["tokenize", str(text), "--tokenizer", str(tmp_path), "-o", str(prompts), "--seq-len", "48"])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "windows of 48 tokens" in r.output
    assert np.load(prompts)["input_ids"].shape == (len(VERSE.encode()) // 48, 48)
    out = tmp_path / "q.onnx"
    r = CliRunner().invoke(cli, ["quantize", str(SAMPLES / "tiny_decoder" / "model.onnx"), "--mode", "int4", "--data", str(prompts),
                                 "-o", str(out), "--no-latency", "-q"])
    assert r.exit_code == 0, r.output
    assert out.exists()


def test_text_given_as_data_names_the_command_that_tokenizes_it(tmp_path):
    text = tmp_path / "verse.txt"
    text.write_text(VERSE)
    r = CliRunner().invoke(cli, ["quantize", str(SAMPLES / "tiny_decoder" / "model.onnx"), "--mode", "int4", "--data", str(text),
                                 "-o", str(tmp_path / "q.onnx")])
    assert r.exit_code == 1
    assert "is text: turn it into token ids first" in r.output and "qconv tokenize" in r.output
    assert not (tmp_path / "q.onnx").exists()


def test_without_the_tokenizers_package_it_is_a_usage_error_naming_the_extra(tmp_path, monkeypatch):
    _byte_level_tokenizer(tmp_path / "tokenizer.json")
    text = tmp_path / "verse.txt"
    text.write_text(VERSE)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now raises ImportError
    r = CliRunner().invoke(cli, ["tokenize", str(text), "--tokenizer", str(tmp_path), "-o", str(tmp_path / "p.npz")])
    assert r.exit_code == 2
    assert r.output.strip().endswith("tokenizing text needs the tokenizers package: pip install 'qconv[text]'")
    assert not (tmp_path / "p.npz").exists()


@pytest.mark.parametrize("args, code, message", [
    (["--seq-len", "1"], 2, "--seq-len must be at least 2"),
    (["--windows", "0"], 2, "--windows must be at least 1"),
    (["-o", "p.npy"], 2, "name it .npz"),
])
def test_bad_options_exit_before_any_work(tmp_path, monkeypatch, args, code, message):
    _byte_level_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "verse.txt").write_text(VERSE)
    monkeypatch.chdir(tmp_path)
    base = ["tokenize", "verse.txt", "--tokenizer", "tokenizer.json"]
    r = CliRunner().invoke(cli, base + (args if "-o" in args else ["-o", "p.npz", *args]))
    assert r.exit_code == code and message in r.output
    assert not (tmp_path / "p.npz").exists() and not (tmp_path / "p.npy").exists()


def test_a_missing_tokenizer_file_is_named(tmp_path):
    (tmp_path / "verse.txt").write_text(VERSE)
    r = CliRunner().invoke(cli, ["tokenize", str(tmp_path / "verse.txt"), "--tokenizer", str(tmp_path), "-o", str(tmp_path / "p.npz")])
    assert r.exit_code == 1 and f"tokenizer not found: {tmp_path / 'tokenizer.json'}" in r.output
