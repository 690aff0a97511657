"""`SFTDataModule`: data sets (files, hub ids or generated tasks) -> tokenized, padded SFT batches."""

from __future__ import annotations

import logging
import random
from itertools import chain, zip_longest

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from lit_heads.data.collate import PromptEncoder, SFTCollator, pad_token_id
from lit_heads.data.readers import is_hub_source, load_examples
from lit_heads.data.records import Example, check_format_name
from lit_heads.data.resumable_sampler import ResumableDataLoader, ResumableRandomSampler
from lit_heads.data.tasks import generate_task, get_task
from lit_heads.errors import ConfigError, DataError

log = logging.getLogger(__name__)

GENERATED_PREFIX = "generated:"


def parse_generated(spec: str) -> list[str] | None:
    """Task names of a 'generated:a,b' source (validated), or None for any other source."""
    if not spec.startswith(GENERATED_PREFIX):
        return None
    names = [n.strip() for n in spec[len(GENERATED_PREFIX):].split(",") if n.strip()]
    if not names:
        raise DataError(f"'{spec}' names no task; write e.g. 'generated:arithmetic,code'.")
    for name in names:
        get_task(name)
    return names


def load_source(source: str, size: int, seed: int, format: str = "auto", split: str = "train") -> list[Example]:
    """Examples of one data source: a file, a hub id, or 'generated:<tasks>' (`size` examples in
    total, split evenly over the tasks and interleaved). Files and hub sets are returned whole."""
    tasks = parse_generated(source)
    if tasks is None:
        return load_examples(source, format, split=split)
    return _interleave([generate_task(t, n, seed) for t, n in zip(tasks, _shares(size, len(tasks)))])


def check_data_sources(config) -> None:
    """Fail now on a data config that cannot work: an unknown format name or generated task, a missing
    file, or a file with a record of no known format (or any other bad record). Local files are read
    and converted whole (cheap next to tokenizing); hub data sets are only checked when loaded.
    `config` is the `data` section (SFTDataModule's arguments, a dict or jsonargparse Namespace)."""
    fmt = check_format_name(config.get("format") or "auto")
    for source in (config.get("train"), config.get("val"), config.get("test")):
        if source is None or parse_generated(source) is not None or is_hub_source(source):
            continue
        load_examples(source, fmt)


def _shares(total: int, parts: int) -> list[int]:
    """Split `total` as evenly as possible over `parts` (earlier parts get the remainder)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def _interleave(groups: list[list[Example]]) -> list[Example]:
    # Round-robin so any prefix (e.g. the first n generation examples) covers every task evenly.
    return [ex for ex in chain.from_iterable(zip_longest(*groups)) if ex is not None]


class SFTDataModule(L.LightningDataModule):
    """Turns a data set into SFT batches: `input_ids`, `attention_mask`, `labels` (-100 on prompt and
    padding), right-padded per batch. Also hands the LightningModule the examples and prompt ids it
    needs for generation-based accuracy (`generation_examples`, `render_prompt_ids`)."""

    def __init__(
        self,
        tokenizer: str = "smollm2-135m",
        train: str = "generated:arithmetic,code,string,math_code",
        val: str | None = None,
        test: str | None = None,
        val_split: float = 0.1,
        train_size: int = 1000,
        val_size: int = 64,
        format: str = "auto",
        max_length: int = 256,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 42,
        use_chat_template: bool | None = None,
    ):
        """
        Args:
            tokenizer: Model name given to `lit_heads.models.load_tokenizer` (use the same name as the
                model). From Python a tokenizer object is accepted too, or assign `dm.tokenizer = tok`
                before `setup`.
            train: Training data: a .jsonl/.json/.parquet file, a hub data set id `owner/name` (or
                `owner/name:config`), or `generated:<task>[,<task>...]` (tasks: arithmetic, code,
                string, math_code).
            val: Validation data in the same forms; null to split it off `train`.
            test: Test data in the same forms; null to test on the validation data.
            val_split: Fraction of a file/hub `train` set held out for validation when `val` is null.
            train_size: Number of training examples for `generated:` sources, in total, split evenly over
                the listed tasks.
            val_size: Number of validation (and test) examples for `generated:` sources, in total.
            format: Record format: auto (detect from keys), prompt_response, question_answer, alpaca,
                messages or sharegpt.
            max_length: Maximum tokens per sample; longer samples lose the end of their response (counted
                and reported). A prompt that leaves no room for the response is an error.
            batch_size: Samples per batch.
            num_workers: DataLoader worker processes.
            seed: Seed for generated tasks, the train/validation split and the training shuffle order.
            use_chat_template: Render prompts with the tokenizer's chat template; null uses it when the
                tokenizer has one.
        """
        super().__init__()
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, str) else ["tokenizer"])
        if isinstance(tokenizer, str):
            self.tokenizer_name, self._tokenizer = tokenizer, None
        else:
            self.tokenizer_name, self._tokenizer = getattr(tokenizer, "name_or_path",
                                                           type(tokenizer).__name__), tokenizer
        if not 0.0 <= val_split < 1.0:
            raise ConfigError(f"val_split must be in [0, 1), got {val_split}.")
        if train_size < 1 or val_size < 0 or batch_size < 1:
            raise ConfigError(f"Need train_size >= 1, val_size >= 0 and batch_size >= 1; got {train_size}, {val_size}, "
                              f"{batch_size}.")
        self.train_source, self.val_source, self.test_source = train, val, test
        self.val_split, self.train_size, self.val_size = val_split, train_size, val_size
        self.format = check_format_name(format)
        self.max_length, self.batch_size, self.num_workers = max_length, batch_size, num_workers
        self.seed, self.use_chat_template = seed, use_chat_template
        self._encoder: PromptEncoder | None = None
        self.train_examples: list[Example] = []
        self.val_examples: list[Example] = []
        self.test_examples: list[Example] | None = None
        self._built = False

    # ------------------------------------------------------------------ tokenizer and encoding

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from lit_heads.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer, self._encoder, self._built = tokenizer, None, False

    @property
    def encoder(self) -> PromptEncoder:
        if self._encoder is None:
            self._encoder = PromptEncoder(self.tokenizer, self.max_length, self.use_chat_template)
        return self._encoder

    def render_prompt_ids(self, example: Example) -> list[int]:
        """Prompt token ids exactly as in training, ending with the generation prompt."""
        return self.encoder.prompt_ids(example)

    # ------------------------------------------------------------------ loading

    def _load(self, source: str, size: int, seed: int, split: str) -> list[Example]:
        return load_source(source, size, seed, self.format, split)

    def _load_train_val(self) -> tuple[list[Example], list[Example]]:
        tasks = parse_generated(self.train_source)
        if self.val_source is not None:
            train = self._load(self.train_source, self.train_size, self.seed, "train")
            # A different seed for a separately generated validation set; it may repeat a few training
            # prompts, which leaving `val` null avoids.
            return train, self._load(self.val_source, self.val_size, self.seed + 1, "validation")
        if tasks is not None:
            # One stream per task: the first examples are validation, the rest training, so the two
            # never share a prompt and the validation set does not change with train_size.
            train_groups, val_groups = [], []
            for task, n_train, n_val in zip(tasks, _shares(self.train_size, len(tasks)),
                                            _shares(self.val_size, len(tasks))):
                examples = generate_task(task, n_val + n_train, self.seed)
                val_groups.append(examples[:n_val])
                train_groups.append(examples[n_val:])
            return list(chain.from_iterable(train_groups)), _interleave(val_groups)
        examples = load_examples(self.train_source, self.format, split="train")
        n_val = round(len(examples) * self.val_split)
        if self.val_split > 0 and n_val == 0:
            n_val = 1  # asked for validation: never silently run without it
        if n_val >= len(examples):
            raise DataError(
                f"'{self.train_source}' has {len(examples)} examples, too few to hold out {self.val_split:.0%} for "
                f"validation and keep some for training. Add data, lower val_split, or give a separate val file."
            )
        order = list(range(len(examples)))
        random.Random(self.seed).shuffle(order)
        val = [examples[i] for i in sorted(order[:n_val])]
        train = [examples[i] for i in sorted(order[n_val:])]
        return train, val

    def setup(self, stage: str | None = None) -> None:
        if self._built:
            return
        self.train_examples, self.val_examples = self._load_train_val()
        if self.test_source is not None:
            self.test_examples = self._load(self.test_source, self.val_size, self.seed + 2, "test")
        self._train_data, self.train_truncated = self.encoder.encode_all(self.train_examples, "train")
        self._val_data, self.val_truncated = self.encoder.encode_all(self.val_examples, "validation")
        self._test_data = self.encoder.encode_all(self.test_examples,
                                                  "test")[0] if self.test_examples is not None else None
        log.info("SFT data: %d train, %d validation examples (max_length=%d, chat template: %s)",
                 len(self._train_data), len(self._val_data), self.max_length, self.encoder.use_chat_template)
        self._built = True

    def _ensure_setup(self) -> None:
        if not self._built:
            self.setup("fit")

    # ------------------------------------------------------------------ loaders

    def _loader(self, data: list[dict], shuffle: bool, sampler=None) -> DataLoader:
        # Resumable: the shuffle order is a function of (seed, epoch) and the loader's position goes
        # into every checkpoint, so a run resumed mid-epoch trains on the same batches as an
        # uninterrupted one (lit_heads/data/resumable_sampler.py).
        return ResumableDataLoader(
            data,
            batch_size=self.batch_size,
            sampler=ResumableRandomSampler(data, self.seed) if shuffle else sampler,
            collate_fn=SFTCollator(pad_token_id(self.tokenizer)),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self._ensure_setup()
        return self._loader(self._train_data, shuffle=True)

    def _eval_loader(self, data: list[dict]) -> DataLoader:
        # Under DDP each rank evaluates its own share, each sample exactly once: Lightning's default
        # DistributedSampler pads the set with repeated samples to an equal count per rank, which
        # would count those twice in the validation loss. (Ranks may run one batch more or fewer;
        # only DDP's first no-grad forward syncs buffers, so each rank needs one sample at least.)
        trainer = self.trainer
        if trainer is None or trainer.world_size < 2 or len(data) < trainer.world_size:
            return self._loader(data, shuffle=False)
        sampler = UnrepeatedDistributedSampler(data, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                               shuffle=False)
        return self._loader(data, shuffle=False, sampler=sampler)

    def val_dataloader(self) -> DataLoader | list:
        self._ensure_setup()
        # No validation data (val_split=0): an empty list makes Lightning skip validation.
        return self._eval_loader(self._val_data) if self._val_data else []

    def test_dataloader(self) -> DataLoader | list:
        self._ensure_setup()
        if self._test_data is None:
            return self.val_dataloader()
        return self._eval_loader(self._test_data)

    def make_dataloader(self, examples: list[Example], shuffle: bool = False) -> DataLoader:
        """A loader over any examples (e.g. one task's, for head scoring), encoded like training data."""
        return self._loader(self.encoder.encode_all(examples, "extra")[0], shuffle=shuffle)

    def generation_examples(self, n: int, split: str = "val") -> list[Example]:
        """The first `n` examples of `split`, 'val' or 'test' (the validation examples when there is no
        test set); fixed for a given config, generated tasks alternate."""
        self._ensure_setup()
        if split == "test" and self.test_examples is not None:
            return self.test_examples[:n]
        return self.val_examples[:n]
