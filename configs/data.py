"""Data config: sources, record formats, tokenizer, packing and the embedded default dataset.

Source spec strings (`train`, `eval`) are comma-separated sources, each `path` or `path@weight`:
  a file (.txt, .jsonl, .json, .tsv, .parquet, .array_record, or .gz of the text kinds), a glob of such files, `tfds:NAME[:SPLIT]`
  (a TFDS dataset prepared locally in array_record format), or a built-in of the embedded
  fictional encyclopedia: `builtin:bios` (all biographies, plain text), `builtin:bios_eval`
  (one fresh biography per person, new template choices: a pretraining eval of facts, not
  strings), `builtin:bios_qa_train` (QA chats about training people), `builtin:bios_qa_heldout`
  (QA chats about held-out people), `builtin:bios_dpo_train` / `builtin:bios_dpo_heldout`
  (preference pairs: the true answer chosen, a wrong one rejected), `builtin:bios_r1_train` /
  `builtin:bios_r1_heldout` (reasoning traces `<think>...</think>answer`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seq_len = 256  # tokens per packed block (inputs and targets each have this length)
  c.batch_size = 16  # GLOBAL rows per step; each process gets batch_size // process_count
  c.train = "builtin:bios_qa_train"  # training sources (spec string, see module docstring)
  c.eval = "builtin:bios_qa_heldout"  # evaluation sources; "" = no evaluation
  c.format = "auto"  # auto | text | chat | alpaca | sharegpt | pair: record shape, auto detects per source
  c.text_field = "text"  # field holding the document in JSON/Parquet/TFDS text records (a string, or a list of strings joined by newlines)
  c.roles = "given"  # given: chat turns name their role | alternate: turns without roles (KdConv, plain strings) alternate user, assistant, ...
  c.rename_fields = ""  # rename record fields before reading them, OLD:NEW,... e.g. "abstract:instruction,title:output" (a TSV's columns as Alpaca)
  c.tsv_columns = ""  # column names of .tsv files without a header line, comma-separated; "" = the first line is the header
  c.mode = "sft"  # pretrain: train on all tokens, split long docs | sft: assistant tokens only, truncate | dpo: preference pairs
  c.packing = "auto"  # auto (pretrain: concat_then_split, sft: best_fit) | first_fit | best_fit | concat_then_split | none
  c.packing_bins = 0  # bins the first/best-fit packers fill at once; 0 = 4 x per-process batch
  c.shuffle_seed = -1  # seed of the record shuffle; -1 uses the job's config.seed
  c.worker_count = 0  # grain worker processes; 0 runs in the main process (tests, CI)
  c.worker_buffer_size = 2  # batches each worker prepares ahead (with worker_count > 0)
  c.count_examples = 5000  # SFT/DPO: records per split tokenized at start to count what seq_len keeps and drops (an even sample when more; 0 = off)
  c.skip_bad_records = False  # skip (and count in the logs) malformed records instead of failing
  c.clean_text = False  # pretraining hygiene: drop empty brackets and wiki/HTML markup from text
  c.max_doc_chars = 0  # cut text documents longer than this at a sentence end; 0 = no cut
  c.sentence_ends = "。！？.!?"  # characters a document may be cut after (with max_doc_chars)
  c.tfds_data_dir = ""  # TFDS data_dir for `tfds:` sources (pip install tensorflow-datasets); "" = ~/tensorflow_datasets

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""  # "" = train SentencePiece on the train sources (cached as workdir/tokenizer.model) | a .model | a tokenizer.json or its dir
  c.tokenizer.vocab_size = 4096  # vocabulary size when training (minimind uses 6400)
  c.tokenizer.model_type = "bpe"  # SentencePiece algorithm when training: bpe | unigram
  c.tokenizer.train_max_sentences = 200_000  # bound on training lines sampled from the corpus
  c.tokenizer.train_max_bytes = 64_000_000  # bound on the UTF-8 bytes sampled evenly over the corpus (SentencePiece holds them all in memory)
  c.tokenizer.character_coverage = 0.9995  # share of characters that get their own piece (rest: bytes)

  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.n_entities = 1500  # invented people in the encyclopedia
  c.synthetic.bios_per_entity = 3  # biography variants per person and language (new template draws, shuffled order)
  c.synthetic.templates_per_attribute = 4  # sentence templates per attribute and language (at most 5)
  c.synthetic.heldout_fraction = 0.2  # share of people whose QA is held out for evaluation
  c.synthetic.qa_phrasings = 1  # single-turn QA chats per person and attribute, each a different question phrasing (1..4)
  c.synthetic.multi_turn_per_entity = 1  # multi-turn QA chats per person and language (plus one single-turn chat per attribute)
  c.synthetic.system_prompt_prob = 0.3  # share of QA chats that open with a system turn
  c.synthetic.languages = "zh,en"  # languages to write: zh, en or both
  c.synthetic.augment = ""  # "" = the biographies above | single | multiN[+permute], e.g. multi5+permute (replaces bios_per_entity; Physics of LM 3.1)
  c.synthetic.unseen_fraction = 0.0  # share of people whose biographies are left out of builtin:bios (their QA is kept)
  c.synthetic.seed = 1234  # the encyclopedia's seed (the same seed always yields the same data)
  return c
