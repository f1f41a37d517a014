"""The plumbing: everything a run needs that is not the lesson. A first reading can skip it.

    cli            flags and their checks, the device, one-sentence errors (guarded_main)
    errors         the errors a user sees, each with its exit code
    session        a training run's bookkeeping, behind the few calls training.py makes
    startup        torchrun, the device, the download, the size checks, before the lesson's setup
    signals        Ctrl-C, SIGTERM and SIGHUP; output to a pipe that closes
    files          atomic writes, the lock on --save
    checkpoint     checkpoint files, their validation, SAVE.resume
    metrics        SAVE.metrics.jsonl
    distributed    torchrun: each rank's share of the columns, what the ranks exchange
    wikitext       the WikiText-2 download and the streamed, checked reader
    rnn_autocast   the RNN under autocast where PyTorch's default does not fit the device
    cpu_fp16_matmul, chunked_cross_entropy   CPU speed fixes for fp16 products and low-precision logits
    onnx_export    --onnx-export

The package imports one lesson file, model.py (which imports only torch and rnn_autocast here),
to rebuild models from checkpoints and to check the model's flags; no other lesson file.
"""
