"""torchrun: two CPU processes (gloo) train and score exactly like one process, and one writes.

The reference two-process run is a real ``torchrun`` command (its output and files are what the
README promises); the other multi-process runs fork ranks from this process with torchrun's
variables (conftest.run_ranks): the same process group and code, without ~10 s of imports in
each new interpreter.

The runs use the tiny BERT (dropout 0) with LoRA dropout 0, so the only differences between one
process and two are the order of floating-point sums. They pin --precision fp32: in bf16 the
two orders of summation differ by bf16's rounding (~1e-3), far above the 1e-5 that shows a
gradient averaged wrongly.
"""

from __future__ import annotations

import json
import signal

import interrupt_train
import pytest
import torch
from conftest import Outcome, run_main, run_ranks, run_script
from datasets import Dataset
from safetensors.torch import load_file

import evaluate
import train as train_script
from data import PaddingCollator, make_loader
from machinery.runtime import evaluation_shard

# 20 training reviews (4 go to validation) in batches of 16 = 2 steps an epoch; 13 test reviews
# in batches of 4 = 4 batches, so one rank scores 8 reviews and the other 5, and the validation
# split (4 reviews, one batch) leaves the second rank nothing to score.
COMMON_FLAGS = ["--epochs", "2", "--validation-size", "4", "--eval-samples", "13",
                "--eval-batch-size", "4", "--lora-dropout", "0", "--lr", "1e-2",
                "--log-every", "1", "--precision", "fp32"]
GLOBAL_BATCH = 16
ADAPTER_FILE = "adapter/adapter_model.safetensors"


def torchrun(*args: str, processes: int = 2):
    """Run a repository script under ``torchrun --standalone`` with `processes` CPU processes."""
    return run_script("-m", "torch.distributed.run", "--standalone",
                      f"--nproc_per_node={processes}", *args, timeout=300)


def train(model: str, data, output, *flags: str, processes: int):
    """train.py under torchrun with `processes` processes."""
    result = torchrun("train.py", "--model", model, "--data", str(data), "--output-dir",
                      str(output), *COMMON_FLAGS, *flags, processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, shared_data_dir, tmp_path_factory):
    """One process with batch 16 (train.main here: no torchrun, no process group)."""
    run = tmp_path_factory.mktemp("one") / "run"
    assert train_script.main(["--model", tiny_model_dir, "--data", str(shared_data_dir),
                              "--output-dir", str(run), *COMMON_FLAGS,
                              "--batch-size", str(GLOBAL_BATCH)]) == 0
    return run


@pytest.fixture(scope="module")
def two_processes(tiny_model_dir, shared_data_dir, tmp_path_factory):
    """Two processes with batch 8 each: the same global batch of 16."""
    run = tmp_path_factory.mktemp("two") / "run"
    return run, train(tiny_model_dir, shared_data_dir, run, "--batch-size", str(GLOBAL_BATCH // 2),
                      processes=2)


def read_log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_training(run, reference) -> None:
    """The same adapter (within 1e-5) and the same training losses, step by step."""
    expected, actual = load_file(reference / ADAPTER_FILE), load_file(run / ADAPTER_FILE)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(actual[name], expected[name], atol=1e-5), name
    losses = [(r["step"], r["loss"]) for r in read_log(run) if "loss" in r]
    expected_losses = [(r["step"], r["loss"]) for r in read_log(reference) if "loss" in r]
    assert [step for step, _ in losses] == [step for step, _ in expected_losses] == [1, 2, 3, 4]
    # Equal second-epoch losses: both runs reshuffle the second epoch the same way.
    for (_, loss), (_, expected_loss) in zip(losses, expected_losses, strict=True):
        assert loss == pytest.approx(expected_loss, abs=1e-5)


def test_two_processes_train_the_same_adapter_as_one_with_the_same_global_batch(
        one_process, two_processes):
    assert_same_training(two_processes[0], one_process)


def train_in_ranks(flags: list[str], processes: int = 2) -> list[Outcome]:
    """train.main(flags) in `processes` forked ranks (conftest.run_ranks); every one must
    finish."""
    outcomes = run_ranks(lambda: train_script.main(flags), processes)
    for outcome in outcomes:
        assert outcome.returncode == 0, outcome.stderr[-3000:]
    return outcomes


def test_accumulating_under_ddp_trains_the_same_adapter(tiny_model_dir, shared_data_dir, tmp_path,
                                                        one_process):
    # 2 processes x batch 4 x 2 accumulated batches: the first backward skips the all-reduce.
    run = tmp_path / "run"
    train_in_ranks(["--model", tiny_model_dir, "--data", str(shared_data_dir), "--output-dir",
                    str(run), *COMMON_FLAGS, "--batch-size", str(GLOBAL_BATCH // 4),
                    "--grad-accum-steps", "2"])
    assert_same_training(run, one_process)


def test_sharded_evaluation_gives_exactly_the_one_process_metrics(
        shared_data_dir, one_process, two_processes, tmp_path, capsys):
    one, (two, _) = one_process, two_processes
    single, sharded = (json.loads((run / "metrics.json").read_text()) for run in (one, two))
    assert sharded["before"]["n"] == 13
    assert sharded["before"] == single["before"]  # the same model: every number equal
    # The trained adapters differ in the last bits, so score the two-process adapter again
    # in one process, as evaluate.py does.
    out = tmp_path / "eval.json"
    result = run_main(evaluate.main, capsys, "--base", "--checkpoint", str(two), "--data",
                      str(shared_data_dir), "--eval-samples", "13", "--eval-batch-size", "4",
                      "--precision", "fp32", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    base, adapted = json.loads(out.read_text())["results"]
    assert {k: base[k] for k in sharded["before"]} == sharded["before"]
    assert {k: adapted[k] for k in sharded["after"]} == sharded["after"]
    # Validation (one batch: the second rank scores nothing) agrees with one process's at
    # every check: the same counts, and the loss within the adapters' last-bit differences.
    validations = {run: [r["validation"] for r in read_log(run) if "validation" in r]
                   for run in (one, two)}
    assert [v["n"] for v in validations[two]] == [4, 4]
    for ours, expected in zip(validations[two], validations[one], strict=True):
        assert ours["confusion_matrix"] == expected["confusion_matrix"]
        assert ours["accuracy"] == expected["accuracy"] and ours["f1"] == expected["f1"]
        assert ours["loss"] == pytest.approx(expected["loss"], abs=1e-5)


def test_only_rank_0_prints_and_writes(one_process, two_processes):
    one, (two, result) = one_process, two_processes

    def files(run):
        return sorted(str(path.relative_to(run)) for path in run.rglob("*"))

    assert files(two) == files(one)
    assert [(r["step"], sorted(r)) for r in read_log(two)] == \
        [(r["step"], sorted(r)) for r in read_log(one)]  # no record written twice
    for line in ("Data: 20 training", "Pre-trained model:", "Test reviews (13)", "step 2:"):
        assert result.stdout.count(line) == 1, line
    assert "x 2 processes" in result.stdout
    config = json.loads((two / "config.json").read_text())
    assert config["world_size"] == 2 and config["batch_size"] == GLOBAL_BATCH // 2


@pytest.mark.parametrize("n_examples, batch_size, world_size", [
    (13, 4, 2), (16, 4, 2), (5, 8, 2), (100, 7, 3), (9, 2, 1)])
def test_evaluation_shards_are_whole_batches_that_cover_every_example_once(
        n_examples, batch_size, world_size):
    shards = [evaluation_shard(n_examples, batch_size, rank, world_size)
              for rank in range(world_size)]
    assert sorted(p for shard in shards for p in shard) == list(range(n_examples))
    single_batches = [list(range(n_examples))[i:i + batch_size]
                      for i in range(0, n_examples, batch_size)]
    for shard in shards:
        batches = [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]
        assert all(batch in single_batches for batch in batches)


def example_ids(batch: dict) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_the_ranks_batches_together_are_the_one_process_batch_in_every_epoch():
    # Example i is the one-token review [i]; 40 examples, 2 ranks x batch 4 = one batch of 8.
    tokens = Dataset.from_dict({"input_ids": [[i] for i in range(40)], "label": [0] * 40})
    collate = PaddingCollator(pad_token_id=-1, device=torch.device("cpu"))
    one = make_loader(tokens, 8, collate, shuffle=True, seed=5)
    ranks = [make_loader(tokens, 4, collate, shuffle=True, seed=5, rank=rank, world_size=2)
             for rank in range(2)]
    orders = []
    for epoch in range(2):
        for loader in (one, *ranks):
            loader.sampler.set_epoch(epoch)
        expected = [sorted(example_ids(batch)) for batch in one]
        together = [sorted(example_ids(a) + example_ids(b))
                    for a, b in zip(*ranks, strict=True)]
        assert together == expected
        orders.append([i for batch in one for i in example_ids(batch)])
    assert orders[0] != orders[1]  # a new order every epoch
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(40))


def test_a_killed_two_process_run_resumes_to_the_identical_adapter(
        tiny_model_dir, shared_data_dir, tmp_path, two_processes):
    """Both ranks are SIGKILLed after step 3 (of 4); the same command on two ranks resumes
    from the epoch-end snapshot of step 2, each rank with its own random streams, and ends
    with exactly the uninterrupted (torchrun) two-process adapter."""
    run = tmp_path / "run"
    flags = ["--model", tiny_model_dir, "--data", str(shared_data_dir), "--output-dir", str(run),
             *COMMON_FLAGS, "--batch-size", str(GLOBAL_BATCH // 2)]
    killed = run_ranks(lambda: interrupt_train.run("kill-at-step:3", flags))
    assert [outcome.returncode for outcome in killed] == [-signal.SIGKILL] * 2
    assert not (run / "metrics.json").exists()
    resumed = train_in_ranks(flags)
    assert [outcome.stdout.count("at step 2 of 4") for outcome in resumed] == [1, 0]  # rank 0
    expected, actual = load_file(two_processes[0] / ADAPTER_FILE), load_file(run / ADAPTER_FILE)
    assert all(torch.equal(actual[name], expected[name]) for name in expected)

    def without_speed(run) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_log(run)]

    assert without_speed(run) == without_speed(two_processes[0])  # every loss, bit for bit
