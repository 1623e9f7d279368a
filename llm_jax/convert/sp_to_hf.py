"""SentencePiece .model -> a Hugging Face `tokenizers` Tokenizer (tokenizer.json) with the same ids.

Written against the model proto with the `tokenizers` package only, so exporting needs neither
transformers nor torch. It follows SentencePiece's own rules rather than one HF model's legacy:
  normalisation   the model's precompiled charsmap (nmt_nfkc, ...; none for "identity"), then
                  remove_extra_whitespaces (strip, collapse runs of spaces) if set, then spaces
                  -> "▁" with one "▁" prepended to the text if add_dummy_prefix is set;
  model           BPE (merges ranked by the merged piece's id, which is SentencePiece's score
                  order) or Unigram (the pieces' scores), both with byte fallback if trained so;
  special pieces  control symbols (<|im_start|>, ...) become special added tokens and
                  user-defined symbols (<think>) non-special ones, matched whole, as in SentencePiece.
Differences left: llm_jax's SentencePiece tokenizer spells a literal "▁" (U+2581) in user text
as bytes, while the converted tokenizer reads it as a space; and for Unigram models, control-token
text typed by a user whose characters are not all in the vocabulary may match the control piece
(tokenizers scores unknown characters at the lowest piece score, so no score can rule it out).
"""

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

_META = "\u2581"
_NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2


def load_proto(path: str) -> sentencepiece_model_pb2.ModelProto:
  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  return proto


def _bpe_merges(pieces) -> list[tuple[str, str]]:
  """Every split (left, right) of a normal piece into two normal pieces, ranked by the merged
  piece's id: SentencePiece merges the pair whose result scores highest, and BPE piece scores
  fall with the id."""
  normal = {p.piece: i for i, p in enumerate(pieces) if p.type == _NORMAL}
  merges = []
  for piece, i in normal.items():
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in normal and right in normal:
        merges.append((i, normal[left], normal[right], left, right))
  merges.sort()
  return [(m[3], m[4]) for m in merges]


def convert(path: str) -> Tokenizer:
  """The tokenizers.Tokenizer equivalent of the SentencePiece model at `path`."""
  proto = load_proto(path)
  trainer, norm = proto.trainer_spec, proto.normalizer_spec
  if trainer.treat_whitespace_as_suffix:
    raise ValueError(f"{path}: treat_whitespace_as_suffix=true is not supported by the converter")
  if not norm.escape_whitespaces:
    raise ValueError(f"{path}: escape_whitespaces=false is not supported by the converter")
  pieces = list(proto.pieces)
  if trainer.model_type == _BPE:
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    model = models.BPE(vocab=vocab, merges=_bpe_merges(pieces), unk_token=trainer.unk_piece,
                       fuse_unk=True, byte_fallback=trainer.byte_fallback, dropout=None)
  elif trainer.model_type == _UNIGRAM:
    # SentencePiece keeps control, unknown, unused and byte pieces out of its lattice, so text
    # such as "<|im_start|>" is never read as that piece; tokenizers' Unigram has no such notion,
    # so those pieces get a score far below any real path through the text.
    floor = min((p.score for p in pieces if p.type == _NORMAL), default=0.0) - 1000.0
    model = models.Unigram(
        [(p.piece, p.score if p.type in (_NORMAL, _USER) else floor) for p in pieces],
        unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
  else:
    raise ValueError(f"{path}: SentencePiece model_type {trainer.model_type} is not supported "
                     "(only unigram and bpe)")
  tok = Tokenizer(model)

  steps = []
  if norm.precompiled_charsmap:
    steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
  if norm.remove_extra_whitespaces:
    steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
  if steps:
    tok.normalizer = normalizers.Sequence(steps)
  # Metaspace with prepend_scheme "first" adds the dummy "▁" only before the text's first
  # segment, as SentencePiece does, not after every special token the text contains.
  prepend = "first" if norm.add_dummy_prefix else "never"
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_META, prepend_scheme=prepend, split=False)
  dec = [decoders.Replace(_META, " ")]
  if trainer.byte_fallback:
    dec += [decoders.ByteFallback(), decoders.Fuse()]
  if norm.add_dummy_prefix:
    dec.append(decoders.Strip(content=" ", left=1, right=0))
  tok.decoder = decoders.Sequence(dec)

  tok.add_tokens([AddedToken(p.piece, special=p.type == _CONTROL, normalized=False)
                  for p in pieces if p.type in (_CONTROL, _USER)])
  return tok
