"""Data for SFT: record formats, readers, generated tasks with checkers, tokenization and the
LightningDataModule."""

from lit_heads.data.collate import IGNORE_INDEX, PromptEncoder, SFTCollator, end_of_turn_text
from lit_heads.data.datamodule import SFTDataModule, load_source, parse_generated
from lit_heads.data.readers import load_examples, read_records
from lit_heads.data.records import (
    FORMATS,
    Example,
    detect_format,
    example_to_record,
    extract_final_number,
    parse_gsm8k_answer,
    record_to_example,
)
from lit_heads.data.sandbox import SandboxResult, run_python
from lit_heads.data.tasks import TASKS, TaskSpec, generate_task, get_task, is_checkable, is_correct

__all__ = [
    "Example", "FORMATS", "detect_format", "record_to_example", "example_to_record", "parse_gsm8k_answer",
    "extract_final_number", "load_examples", "read_records", "TASKS", "TaskSpec", "generate_task", "get_task",
    "is_correct", "is_checkable", "run_python", "SandboxResult", "PromptEncoder", "SFTCollator",
    "end_of_turn_text", "IGNORE_INDEX", "SFTDataModule", "load_source", "parse_generated",
]
