"""qconv tokenize: text into token-id windows that --data reads (calibration of language models on real text)."""

from __future__ import annotations

from pathlib import Path

import click

from qconv.cli.common import guarded
from qconv.jobs.tokenize import DEFAULT_SEQ_LEN, TokenizeJob, run_tokenize


@click.command("tokenize")
@click.argument("text", type=click.Path(path_type=Path))
@click.option("--tokenizer", "tokenizer", required=True, type=click.Path(path_type=Path),
              help="The model's tokenizer.json (Hugging Face tokenizers), or the folder that holds it.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="The .npz to write.")
@click.option("--seq-len", default=DEFAULT_SEQ_LEN, show_default=True, type=int,
              help="Tokens per window, the tokenizer's special tokens (BOS, [CLS]/[SEP]) included.")
@click.option("--windows", default=None, type=int, help="At most this many windows (default: as many as the text fills).")
@click.option("--input-name", default="input_ids", show_default=True, help="The model input the ids feed.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@guarded
def tokenize_cmd(term, text, tokenizer, out, seq_len, windows, input_name, as_json, quiet):
    """Cut TEXT (UTF-8) into windows of token ids for --data: consecutive windows of --seq-len tokens, each framed
    like one sequence of the tokenizer. A decoder's cache, attention_mask, position_ids and token_type_ids are
    derived from input_ids when the model needs them (see Data files in the README). Needs pip install 'qconv[text]'.

    \b
    Example:
      qconv tokenize corpus.txt --tokenizer llm/tokenizer.json -o prompts.npz --windows 128
      qconv quantize llm/model.onnx --mode int4 --data prompts.npz -o llm.int4.onnx
    """
    done = run_tokenize(TokenizeJob(text=text, tokenizer=tokenizer, out=out, seq_len=seq_len, windows=windows,
                                    input_name=input_name))
    if as_json:
        term.print_json(done)
    elif not quiet:
        term.print(f"wrote {done['output']}: {done['windows']} windows of {done['seq_len']} tokens ('{done['input']}', "
                   f"vocabulary {done['vocabulary']})")
