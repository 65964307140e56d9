"""Data pipeline: seqio tasks over local files or TFDS, batches for the trainer, and text metrics.

Importing this package is light: seqio/TensorFlow load on the first `get_dataset` /
`get_eval_examples` / `get_task` call (~5 s); `evaluate` and gkd_jax.data.metrics never load them.

  get_dataset(task_name, split, *, tokenizer, model_kind, prompt_format, data_dir, paths, ...)
      -> iterator of numpy int32 batches (layout: gkd_jax.data.batching)
  get_eval_examples(task_name, split, *, tokenizer, ...) -> [{"prompt_tokens", "prompt_text",
      "reference", "references"}]
  evaluate(task_name, targets, predictions) -> {metric: value}
  config_kwargs(data_config, tokenizer, encoder_decoder) -> the keyword arguments of a run's
      config.data that get_dataset and get_eval_examples take (one home for them)
  TASKS: the registered task names -> TaskSpec (gkd_jax.data.tasks)
"""

import importlib

_LAZY = {
  "get_dataset": "gkd_jax.data.pipeline",
  "get_eval_examples": "gkd_jax.data.pipeline",
  "load_examples": "gkd_jax.data.pipeline",
  "get_task": "gkd_jax.data.seqio_tasks",
  "TokenizerVocabulary": "gkd_jax.data.vocab",
  "make_vocabulary": "gkd_jax.data.vocab",
  "evaluate": "gkd_jax.data.tasks",
  "TASKS": "gkd_jax.data.tasks",
  "TaskSpec": "gkd_jax.data.tasks",
}

__all__ = sorted(_LAZY)


def config_kwargs(d, tokenizer, encoder_decoder: bool) -> dict:
  """The data arguments of config section ``d`` (``config.data``) for ``get_dataset`` and
  ``get_eval_examples``, with the run's tokenizer and model kind."""
  return dict(
    tokenizer=tokenizer,
    model_kind="encdec" if encoder_decoder else "decoder",
    prompt_format=d.prompt_format,
    source=d.source or None,
    data_dir=d.data_dir or None,
    paths=dict(d.paths) or None,
    max_prompt_len=d.max_prompt_len,
    max_target_len=d.max_target_len,
    overlong=d.overlong,
    tokenized_dir=d.tokenized_dir or None,
  )


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'gkd_jax.data' has no attribute {name!r}")
