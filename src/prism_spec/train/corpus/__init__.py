"""The target's own corpus: its answers to a whole prompt set, stored as token ids in shards.

Drafters learn the distribution they are trained on; trained on the target's own replies they
see, at training time, the contexts they meet when drafting for it. This package builds such a
corpus at scale, restartably, on a CPU in the background or on a GPU in one call:

* :func:`.prompts.collect_prompts` reads every prompt of some data files (the first user turn
  of each record, with a system turn before it if any), drops exact repeats and over-long
  prompts, fixes a seeded order (so any prefix of the corpus is a balanced sample of the
  sources) and :func:`.build.create_corpus` stores the rendered prompt token ids in
  ``prompts.npz`` beside the manifest ``corpus.json``.
* :func:`.build.build_corpus` answers them shard by shard (``shard_size`` prompts each) with a
  :class:`.engines.ReplyEngine` and writes ``shard-NNNNN.npz`` (reply ids, finish reasons) plus
  ``shard-NNNNN.json`` (provenance: engine, dtype, device, machine, time) atomically when a
  shard is complete. Replies finished inside an unfinished shard are appended to
  ``shard-NNNNN.partial.jsonl`` first, so an interrupted run loses at most one batch.
* :func:`.read.read_corpus` gives training examples (prompt ids + reply ids, loss on the reply)
  straight from the ids, with no re-tokenisation of decoded text; :func:`.read.corpus_status`
  reports progress, storage and throughput.

Token ids are stored as uint16 when the vocabulary fits (it does for most targets under 65,536
tokens), uint32 otherwise, in compressed ``.npz`` files. A reply ends with the end-of-turn token
the target produced (finish ``stop``) or is cut at ``max_new_tokens`` (finish ``length``).

Modules: :mod:`.store` (the folder's format: manifest, settings, atomic writes, packed ids,
shard files), :mod:`.prompts`, :mod:`.engines` (transformers and llama.cpp), :mod:`.build`
(creating and building a corpus) and :mod:`.read`. Import them directly; nothing is imported
here. ``prism corpus`` is :mod:`prism_spec.train.corpus_cli`.
"""
