"""Rows in and batches out: datasets (builtin, JSON lines, parquet), the trainer's log, and the padding and grouping
of rows into batches."""

from __future__ import annotations

import json

import pytest

from rlhf_trainer.data import builtin_dataset_path, read_rows, require_fields
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.modeling import sequences
from rlhf_trainer.padding import group_rows, index_batches


def test_builtin_and_file_datasets(tmp_path):
    rows = read_rows(builtin_dataset_path("builtin://movie-reviews/prompts-eval"))
    assert len(rows) == 60 and rows[0]["prompt"].startswith("Write a one-sentence movie review")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"prompt": \n')
    with pytest.raises(ConfigError, match="line 2 is not valid JSON"):
        read_rows(bad)
    with pytest.raises(ConfigError, match="row 1 has no text field 'completion'"):
        require_fields([{"prompt": "x"}], ("prompt", "completion"), "d.jsonl")
    with pytest.raises(ConfigError, match="unknown builtin dataset"):
        builtin_dataset_path("builtin://movie-reviews/nope")


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "c", "rejected": "r"}]), path)
    assert read_rows(path) == [{"prompt": "p", "chosen": "c", "rejected": "r"}]


def test_a_resumed_attempts_log_replaces_the_interrupted_ones_steps(tmp_path):
    from rlhf_trainer.plots import read_log

    log = tmp_path / "trainer_log.jsonl"
    steps = [5, 10, 15, 5, 10, 15, 20, 20]  # an attempt died after step 15; the next restarted from step 0
    log.write_text("".join(json.dumps({"step": s, "loss": i}) + "\n" for i, s in enumerate(steps)))
    assert [(e["step"], e["loss"]) for e in read_log(log)] == [(5, 3), (10, 4), (15, 5), (20, 6), (20, 7)]


def test_sequences_left_pad_prompts_and_right_pad_responses():
    batch = sequences([[5, 6], [9]], [[7, 8], [10]], pad_token_id=0)
    assert batch.queries.tolist() == [[5, 6], [0, 9]] and batch.query_mask.tolist() == [[1, 1], [0, 1]]
    assert batch.responses.tolist() == [[7, 8], [10, 0]] and batch.mask.tolist() == [[True, True], [True, False]]
    ids, attention, positions = batch.input_ids()
    assert ids.tolist() == [[5, 6, 7, 8], [0, 9, 10, 0]]
    assert attention.tolist() == [[1, 1, 1, 1], [0, 1, 1, 0]]
    assert positions[:, :3].tolist() == [[0, 1, 2], [0, 0, 1]]


def test_group_rows_keeps_first_appearance_order():
    assert group_rows(["b", "a", "b", "c", "a"]) == [[0, 2], [1, 4], [3]]
    assert group_rows([]) == []


def test_index_batches_in_input_order_or_sorted_by_a_key_stably():
    assert index_batches(5, 2) == [[0, 1], [2, 3], [4]]
    lengths = [7, 3, 9, 3, 1]
    assert index_batches(5, 2, key=lengths.__getitem__) == [[4, 1], [3, 0], [2]]  # equal lengths: 1 before 3
