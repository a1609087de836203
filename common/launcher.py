"""`python -m vitmpp.common.launcher [accelerate launch options] SCRIPT [args]`: `accelerate launch`
without the launcher's own noise, and with the training script's exit code.

`launch.sh` runs every training command through this module. It takes exactly the
options of `accelerate launch` (Accelerate's own parser) and runs Accelerate's own
launch code in-process, changing three things a user meets at the edges:

* Exit status. Plain `accelerate launch` answers a failing script with a
  `CalledProcessError` traceback (one process) or torch's `ChildFailedError` traceback and
  error box (several); `--quiet` silences only the first, and exits 1 whatever the script
  said. Here the script's one-sentence error is all that is printed, and its exit code
  comes back unchanged (2 for a usage error, 130 after Ctrl-C). A rank that dies without
  a word (killed by a signal, out of memory) is reported in one line naming the rank.
* Processes on a CPU-only machine. `accelerate launch --num_processes 2` without GPUs
  starts one process (the multi-process launcher is chosen only with `--multi_gpu`); here
  N > 1 processes on a machine without GPUs form one gloo group, as asked (a config file that
  chooses its own launcher, e.g. `distributed_type: FSDP`, keeps it).
* No "The following values were not passed" warning when launch.sh passes them.

Accelerate offers no setting for the first two (checked against accelerate 1.15's
`commands/launch.py`: `simple_launcher`, `multi_gpu_launcher`), hence this module; it uses
only Accelerate's public launch entry points (`launch_command_parser`, `launch_command`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

EXIT_FAILURE = 1


def _exit_status(code: int) -> int:
    """A child's return code as a shell reports it (a signal N is 128 + N)."""
    return 128 - code if code < 0 else code


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def config_distributed_type(config_file: str | None) -> str | None:
    """`distributed_type` of the Accelerate config this launch reads (FSDP, MULTI_GPU, ...), if any:
    a config that chooses its own launcher (FSDP, DeepSpeed) must not get `--multi_gpu` added."""
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file

    if config_file is None and not os.path.isfile(default_config_file):
        return None
    try:
        return str(load_config_from_file(config_file).distributed_type).split(".")[-1]
    except Exception:  # noqa: BLE001 - Accelerate itself reports an unreadable config next
        return None


# launch.sh's first argument: it passes SIGTERM and SIGUSR1 on to the ranks itself, so the launcher
# starts with them blocked (the ranks inherit the block and lift it, common/distributed.py StopSignal).
# torch's elastic agent would answer one of its own by signalling the ranks again and exiting 143,
# whatever they did; systemd (KillMode=control-group) and SLURM (scancel, the time limit) signal it too.
HOLD_STOP_SIGNALS = "--hold-stop-signals"


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [HOLD_STOP_SIGNALS]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
        argv = argv[1:]
    args = launch_command_parser().parse_args(argv)
    args.quiet = False  # we want the child's return code, which only the non-quiet path carries
    wants_several = (args.num_processes or 1) > 1
    chose_a_launcher = (
        args.multi_gpu
        or args.use_fsdp
        or args.use_deepspeed
        or args.cpu
        or args.tpu
        or config_distributed_type(args.config_file) not in (None, "NO", "MULTI_CPU")
    )
    if wants_several and not chose_a_launcher and _cuda_device_count() == 0:
        # Accelerate would start one process; torchrun forms the group, and our scripts make
        # their Accelerator with cpu=True (common/distributed.py), so it is a gloo group
        args.multi_gpu = True
    # The ranks speak for themselves; the elastic agent's own ERROR lines repeat them
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as failed:  # one process: its error is already on stderr
        return _exit_status(failed.returncode)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # several processes: torch's ChildFailedError, or a signal to the agent
        if type(error).__name__ == "SignalException":  # the ranks got it too and stop with a checkpoint
            return 128 + int(error.sigval)
        failures = getattr(error, "failures", None)
        if not failures:
            raise
        rank, failure = error.get_first_failure()
        if failure.exitcode not in (2, 130):  # 2: a usage error the rank printed; 130: Ctrl-C
            print(
                f"error: rank {rank} {_describe(failure.exitcode)}; the other ranks were stopped "
                "(their output above says more; continue with --resume auto).",
                file=sys.stderr,
            )
        return _exit_status(failure.exitcode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
