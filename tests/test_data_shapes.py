"""Real corpora as they ship (issue 25): Parquet read by many loader threads, .gz copies that are
said and cleaned, encodings checked through the whole file, byte order marks, and the public
record shapes (poetry paragraphs, role-less dialogues, TSV, hh-rlhf transcripts)."""

import json
import random
import threading

import numpy as np
import pytest

from llm_jax.data import sources


# ---- 1. Parquet shared by Grain's loader threads --------------------------------------------

def _parquet(path, n_rows, row_group_size):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [{"text": f"row {i} " + "字" * (i % 17), "id": i} for i in range(n_rows)]
  pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
  assert pq.ParquetFile(path).metadata.num_row_groups == -(-n_rows // row_group_size)
  return rows


@pytest.mark.parametrize("cache_bytes", [None, 1])  # 1: every group evicted at once
def test_parquet_read_by_16_threads_gives_exact_records(tmp_path, monkeypatch, cache_bytes):
  import pyarrow.parquet as pq
  path = str(tmp_path / "three_groups.parquet")
  rows = _parquet(path, 3 * 60, 60)
  decoded = []
  real = pq.ParquetFile.read_row_group

  def counting(self, i, *a, **kw):
    decoded.append(i)
    return real(self, i, *a, **kw)

  monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
  source = sources.open_file(path)
  if cache_bytes is not None:
    source.CACHE_BYTES = cache_bytes
  got, errors = {}, []
  start = threading.Barrier(16)

  def reader(seed):
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)  # as a shuffled dataset reads: groups interleaved
    try:
      start.wait()
      got[seed] = {i: source[i] for i in order}
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=reader, args=(k,)) for k in range(16)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not errors and not any(t.is_alive() for t in threads)
  for seed in range(16):
    assert [got[seed][i] for i in range(len(rows))] == rows
  if cache_bytes is None:  # all three fit the cache: each decoded once, however many threads
    assert sorted(decoded) == [0, 1, 2]
