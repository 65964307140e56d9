"""seqio Tasks for the catalogue in gkd_jax.data.tasks (imports seqio and TensorFlow).

`get_task(name, ...)` builds and registers (once per configuration) a seqio Task named
`gkd_{name}_{source}_{model_kind}_{prompt_format}_{digest}`:

  source            local files (seqio.FunctionDataSource over gkd_jax.data.sources readers, no TFDS
                    download) or TFDS (seqio.TfdsDataSource: xsum, wmt14_translate/de-en, gsm8k)
  -> "inputs"       prompt text = prefix + source + suffix (see tasks.prompt_parts), "targets" text,
                    "references" (tf.string [n_refs])
  -> tokenize       with the vocabulary, 256 texts per call (texts kept as {inputs,targets}_pretokenized)
  -> append EOS     to targets always, to inputs for encoder-decoder models (T5 convention)

Its metric_fns are the task's metrics; for evaluation its postprocess_fn turns a target into the
example's reference list (several for SciTLDR dev and WMT22).
"""

from __future__ import annotations

import functools
import hashlib

import seqio
import tensorflow as tf

from gkd_jax.data import tasks
from gkd_jax.data.tasks import choose_source
from gkd_jax.data.vocab import make_vocabulary


def _local_source(spec, data_dir, paths):
  splits = tuple(dict.fromkeys(tuple(spec.local_splits) + tuple(paths or ())))
  keys = ("source", "target") + (("plain_prompt",) if spec.plain_prompt else ())

  def dataset_fn(split, shuffle_files):
    del shuffle_files  # file order; gkd_jax.data.pipeline shuffles
    records = spec.read_local(split, data_dir, paths)  # read here: file errors raise in Python
    columns = {
      k: tf.constant([r[k] for r in records], tf.string, shape=[len(records)]) for k in keys
    }
    columns["references"] = tf.ragged.constant(
      [r["references"] for r in records], tf.string, ragged_rank=1, inner_shape=()
    )
    return tf.data.Dataset.from_tensor_slices(columns).map(_dense)

  return seqio.FunctionDataSource(dataset_fn, splits=splits)


def _dense(ex):
  return dict(ex)  # inside map, 1-D ragged slices arrive as tf.Tensor: this makes the spec dense


def tokenize_batched(dataset, output_features, batch_size=256):
  """seqio.preprocessors.tokenize (with copy_pretokenized), one vocabulary call per `batch_size`
  examples: each output feature's text becomes int32 ids, its text kept as `{name}_pretokenized`."""

  def encode(batch):
    out = dict(batch)
    for name, feature in output_features.items():
      out[f"{name}_pretokenized"] = batch[name]
      ids = feature.vocabulary.encode_tf(batch[name])
      out[name] = ids if isinstance(ids, tf.RaggedTensor) else tf.RaggedTensor.from_tensor(ids)
    return out

  return dataset.ragged_batch(batch_size).map(encode).unbatch().map(_dense)


@seqio.map_over_dataset
def _from_tfds(ex, source_key, target_key):
  return {
    "source": ex[source_key],
    "target": ex[target_key],
    "references": tf.reshape(ex[target_key], [1]),
  }


@seqio.map_over_dataset
def _format_prompt(ex, prefix, suffix, key):
  return {
    "inputs": tf.strings.join([prefix, ex[key], suffix]),
    "targets": ex["target"],
    "references": ex["references"],
  }


def _as_text(x):
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def postprocess_references(output, example=None, is_target=False):
  """Targets -> the example's list of reference strings; predictions -> str unchanged."""
  if is_target and example is not None and "references" in example:
    return [_as_text(r) for r in example["references"]]
  return _as_text(output)


def get_task(
  name,
  *,
  tokenizer,
  model_kind="decoder",
  prompt_format="t5",
  source=None,
  data_dir=None,
  paths=None,
  tfds_name=None,
  tfds_data_dir=None,
) -> seqio.Task:
  """The registered seqio Task for this configuration (built on first use).

  tokenizer: gkd_jax Tokenizer, SentencePiece .model path, or seqio.Vocabulary ("chat" needs a Tokenizer).
  tfds_name: overrides the task's TFDS dataset, e.g. "wmt_t2t_translate/de-en:1.0.0" (same features).
  """
  spec = tasks.get_spec(name)
  if model_kind not in tasks.MODEL_KINDS:
    raise ValueError(f"unknown model_kind {model_kind!r}; known: {list(tasks.MODEL_KINDS)}")
  source = choose_source(spec, source, data_dir, paths)
  vocabulary = make_vocabulary(tokenizer)
  prefix, suffix = tasks.prompt_parts(spec, prompt_format, getattr(vocabulary, "tokenizer", None))
  config = repr(
    (
      data_dir,
      sorted((paths or {}).items()),
      tfds_name,
      tfds_data_dir,
      str(vocabulary),
      id(getattr(vocabulary, "tokenizer", vocabulary)),
    )
  )
  digest = hashlib.sha1(config.encode()).hexdigest()[:10]
  task_name = f"gkd_{name}_{source}_{model_kind}_{prompt_format}_{digest}"
  if task_name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(task_name)

  if source == "local":
    data_source, preprocessors = _local_source(spec, data_dir, paths), []
  else:
    data_source = seqio.TfdsDataSource(
      tfds_name=tfds_name or spec.tfds_name,
      tfds_data_dir=tfds_data_dir,
      splits=dict(spec.tfds_splits),
    )
    preprocessors = [
      functools.partial(_from_tfds, source_key=spec.tfds_fields[0], target_key=spec.tfds_fields[1])
    ]
  key = "plain_prompt" if (spec.plain_prompt and prompt_format == "t5") else "source"
  preprocessors += [
    functools.partial(_format_prompt, prefix=prefix, suffix=suffix, key=key),
    tokenize_batched,
    seqio.preprocessors.append_eos_after_trim,
  ]
  output_features = {
    "inputs": seqio.Feature(vocabulary, add_eos=model_kind == "encdec"),
    "targets": seqio.Feature(vocabulary, add_eos=True),
  }
  return seqio.TaskRegistry.add(
    task_name,
    source=data_source,
    output_features=output_features,
    preprocessors=preprocessors,
    postprocess_fn=postprocess_references,
    metric_fns=list(spec.metric_fns),
  )
