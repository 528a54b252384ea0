"""The accelerate configs and SLURM scripts under launch/ stay loadable and say what they claim.

Every launch/*.yaml is read with accelerate's own loader (the one `accelerate launch
--config_file` uses, which rejects unknown keys); every launch/*.sbatch must pass
`bash -n`. Nothing is launched.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
YAMLS = sorted(LAUNCH.glob("**/*.yaml"))
SBATCHES = sorted(LAUNCH.glob("**/*.sbatch"))


def _id(path: Path) -> str:
    return str(path.relative_to(LAUNCH))


def _load(name: str) -> ClusterConfig:
    return load_config_from_file(str(LAUNCH / name))


def test_launch_dir_has_configs_and_scripts():
    assert len(YAMLS) > 0, f"no *.yaml under {LAUNCH}"
    assert len(SBATCHES) > 0, f"no *.sbatch under {LAUNCH}"


@pytest.mark.parametrize("path", YAMLS, ids=_id)
def test_yaml_loads_with_accelerate(path: Path):
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert isinstance(config.distributed_type, DistributedType)
    # A bare `no` in YAML is the boolean False, which accelerate would not recognise.
    assert config.mixed_precision in {"no", "fp16", "bf16", "fp8"}, config.mixed_precision
    # -1 (the default) makes `accelerate launch` demand --num_processes.
    assert config.num_processes >= 1
    assert config.num_machines >= 1
    assert config.num_processes % config.num_machines == 0


@pytest.mark.parametrize("path", YAMLS, ids=_id)
def test_yaml_header_documents_its_launch_command(path: Path):
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{path.name}: no comment header"
    assert f"--config_file launch/{_id(path)}" in "\n".join(header)


def test_cpu_multiprocess():
    config = _load("cpu_multiprocess.yaml")
    assert config.num_processes == 2
    assert config.num_machines == 1
    assert config.use_cpu is True
    assert config.mixed_precision == "no"
    # MULTI_CPU would go to accelerate's single-process launcher (1 process without MPI):
    # only MULTI_GPU (+ ACCELERATE_USE_CPU=1) starts 2 local processes in a gloo group.
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert "ACCELERATE_USE_CPU=1 accelerate launch" in (LAUNCH / "cpu_multiprocess.yaml").read_text(encoding="utf-8")


def test_single_gpu():
    config = _load("single_gpu.yaml")
    assert config.distributed_type == DistributedType.NO
    assert config.num_processes == 1
    assert config.mixed_precision == "bf16"
    assert config.use_cpu is False


def test_ddp_1node_8gpu():
    config = _load("ddp_1node_8gpu.yaml")
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert (config.num_machines, config.num_processes) == (1, 8)
    assert config.mixed_precision == "bf16"


def test_fsdp_1node_8gpu():
    config = _load("fsdp_1node_8gpu.yaml")
    assert config.distributed_type == DistributedType.FSDP
    assert (config.num_machines, config.num_processes) == (1, 8)
    assert config.mixed_precision == "bf16"
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_reshard_after_forward"] is True  # FSDP2's FULL_SHARD
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_deepspeed_zero2():
    config = _load("deepspeed_zero2.yaml")
    assert config.distributed_type == DistributedType.DEEPSPEED
    assert config.mixed_precision == "bf16"
    ds = config.deepspeed_config
    assert ds["zero_stage"] == 2
    assert "deepspeed_config_file" not in ds
    # Set here, accelerate would export them and override the trainer's own values.
    assert "gradient_accumulation_steps" not in ds
    assert "gradient_clipping" not in ds


def test_multinode_2x8gpu():
    config = _load("multinode_2x8gpu.yaml")
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.num_machines == 2
    assert config.num_processes == 16
    assert config.machine_rank == 0
    assert config.mixed_precision == "bf16"
    assert config.main_process_ip and config.main_process_port
    # static rendezvous honours --machine_rank (the SLURM node id) as the node rank.
    assert config.rdzv_backend == "static"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
@pytest.mark.parametrize("path", SBATCHES, ids=_id)
def test_sbatch_syntax(path: Path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_slurm_multinode_script():
    text = (LAUNCH / "slurm_multinode.sbatch").read_text(encoding="utf-8")
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.MULTILINE)
    assert "--signal=B:USR1@120" in directives
    assert "--requeue" in directives
    assert "--ntasks-per-node=1" in directives
    # The accelerate config it launches with exists.
    default_config = re.search(r"ACCELERATE_CONFIG:-([^}]+)\}", text)
    assert default_config and (ROOT / default_config.group(1)).is_file()
    assert "scontrol requeue" in text
    assert "experiment_options.resume=true" in text
    # Resources come from the sbatch command line: one script for GPU and CPU partitions.
    assert not [d for d in directives if d.split("=")[0] in ("--gpus-per-node", "--gres", "--cpus-per-task", "--time",
                                                              "--nodes", "--partition")], directives
