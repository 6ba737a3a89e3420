"""Training methods that run on pretrain.engine.Engine, one small module each (solo-learn's layout).

A method is a class built from the config, `Method(config, run_dir)`, with:

    name, log                   its step name ("pretrain", "supervised") and its logger
    may_change                  config keys a resumed run may change without changing its trajectory
    checkpoint_file, previous_file   the checkpoint's name under RUN_DIR/checkpoints/, and the one it replaced
    label                       how a refused run dir names the run ("" or e.g. "supervised")
    read_checkpoint(path)       (static) the checkpoint's content; a UserError when unreadable
    done_when_metrics_exist     True: a rerun into a finished run dir reports it and trains nothing
    device, dist                where it trains (a common.distributed.DistributedEnv)
    steps_per_epoch, total_steps, stop_step
    loader(epoch, start_batch)  the batches of an epoch from `start_batch` on
    train_step(batch, step)     one optimisation step -> stats (None: a batch with nothing to train on)
    images(batch)               images the step saw over all processes (throughput)
    log_due(step), checkpoint_due(step), complete(step)     after `step` steps
    log_stats(stats, step)      what gets logged (and ends in metrics.json) when log_due
    state_dict(step, elapsed_s) the checkpoint's content; load_state_dict(state) -> (step, elapsed_s)
    export(run_dir)             what a completed run leaves beside its checkpoint
    metrics(stats, skipped, step)   write_metrics's task, dataset, backbone, protocol, metrics and extra

The engine owns the rest: the run dir, its lock and config.yaml, the loop, when checkpoints are
written (atomically, the previous kept), resuming, SIGTERM / request_stop, logs, TensorBoard,
history.jsonl and metrics.json."""
