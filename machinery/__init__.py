"""The machinery behind the lesson: what train.py, evaluate.py, data.py, lora_model.py and
predict.py call but a first reading can take on trust. One role a module:

    cli           flags built from dataclasses, one-line user errors, the scripts' runner
    options       the options the scripts share (data, run folder, runtime)
    data_sources  reviews from the Hub, an aclImdb folder or files, as text and label columns
    hub           a pre-trained model's config and tokenizer, checked before any work
    runtime       device, precision, the torchrun process group, the batch orders
    snapshots     stopping a run (signals, a diverging loss) and resuming it exactly
    run_folder    one run per folder: fresh or resumed, locked, config.json first
    checkpoints   what a checkpoint folder holds and how to find it
    files         files written whole or not at all
    stats         intervals, paired tests, calibration (temperature scaling)
    report        the plots and report.md       (python -m machinery.report RUN_DIR)
    summarize     a seed sweep's mean ± std     (python -m machinery.summarize RUN_DIR ...)

The package never imports the lesson (tests/test_layout.py checks it).
"""
